"""An alignment judge behind any OpenAI-compatible chat-completions API.

:class:`OpenAIJudge` sends the rendered judge prompt as one user message with
``max_tokens=1, temperature=0, logprobs=true, top_logprobs=20, seed=0`` and scores the
first answer token (:func:`~piggyback_interp.measures.judges.scoring.parse_chat_completion`).
It works with api.openai.com, vLLM, or a local model served by
:func:`~piggyback_interp.measures.judges.server.serve_chat_completions`.

Failures:

* connection errors, timeouts, HTTP 429 and 5xx, and a 200 whose body is not a chat
  completion (not JSON, not an object, an ``error`` object, no ``choices``) are
  retried with exponential backoff (``backoff_s * 2**k`` capped at ``max_backoff_s``;
  a numeric ``Retry-After`` header lengthens the wait, within the same cap); after
  ``max_retries`` retries a :class:`JudgeError` says how many attempts were made and
  what went wrong last;
* any other HTTP 4xx raises :class:`JudgeError` at once with the server's message
  (for 401/403 it names the environment variable that holds the key);
* a redirect (any 3xx) is not followed: :class:`JudgeError` at once, naming the
  ``Location``. Refused rather than followed with the key stripped on cross-origin
  hops: an OpenAI-compatible API does not redirect its POSTs, so a redirect means a
  wrong ``base_url`` (``http`` for ``https``, a moved host) or a server that is not the
  API, and following it would still send the prompts there. One rule, easy to check;
  the fix is one line: put the address in ``base_url``;
* none of these is cached. A well-formed completion whose answer has no score
  (``"unparsed"``) is a real answer and is cached.

The API key is read from the environment at each request and sent only in the
``Authorization`` header of requests to ``base_url``; it appears in no repr, log or
error message. Requests go through one :class:`httpx.Client` per judge (connections
are reused); :meth:`OpenAIJudge.close` or a ``with`` block releases it.

Example (a tiny local model served on localhost stands in for the API):
    >>> from piggyback_interp.measures.judges.server import serve_chat_completions
    >>> from piggyback_interp.testing import tiny_model
    >>> with serve_chat_completions(tiny_model("llama"), model_name="tiny") as server:
    ...     judge = OpenAIJudge(server.base_url, "tiny")
    ...     judge.score("What is 2 + 2?", "4").label in ("score", "unparsed")
    True
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx

from piggyback_interp.core.errors import PiggybackError
from piggyback_interp.measures.judges.cache import JudgeCache, as_cache
from piggyback_interp.measures.judges.prompts import ALIGNMENT_PROMPT, JudgePrompt
from piggyback_interp.measures.judges.scoring import JudgeScore, check_pairs, parse_chat_completion

logger = logging.getLogger(__name__)


class JudgeError(PiggybackError, RuntimeError):
    """A judge request failed for good; ``status`` is the last HTTP status (None if none)."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status, self.attempts = status, attempts


class _Retry(Exception):
    """A failure worth retrying; ``retry_after`` is the server's numeric Retry-After."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class RateLimiter:
    """At most ``requests_per_minute`` starts per minute, evenly spaced (thread-safe).

    Example:
        >>> now = [0.0]
        >>> limiter = RateLimiter(60, sleep=lambda s: now.__setitem__(0, now[0] + s),
        ...                       clock=lambda: now[0])
        >>> for _ in range(3):
        ...     limiter.wait()
        >>> now[0]
        2.0
    """

    def __init__(
        self,
        requests_per_minute: float | int,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not requests_per_minute > 0:
            raise ValueError(
                f"requests_per_minute must be > 0, got {requests_per_minute}; "
                "pass None for no limit"
            )
        self.interval = 60.0 / requests_per_minute
        self._sleep, self._clock = sleep, clock
        self._next: float | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next request may start, and reserve that start."""
        with self._lock:
            now = self._clock()
            start = now if self._next is None else max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class OpenAIJudge:
    """Score answers with a judge model behind an OpenAI-compatible API.

    Args:
        base_url: the API root, e.g. ``"https://api.openai.com/v1"`` or
            ``"http://localhost:8000/v1"`` (``/chat/completions`` is appended).
        model: the judge model's name on that server, e.g. ``"gpt-4o-2024-08-06"``.
        api_key_env: environment variable holding the API key; without it no
            ``Authorization`` header is sent (fine for local servers).
        prompt: the :class:`JudgePrompt` (:data:`ALIGNMENT_PROMPT`, :data:`COHERENCE_PROMPT`).
        cache: a :class:`JudgeCache` or a path for one; None: no cache.
        max_retries: retries after the first attempt (so ``max_retries + 1`` attempts).
        backoff_s, max_backoff_s: the k-th retry waits ``min(backoff_s * 2**k, max_backoff_s)``.
        requests_per_minute: evenly spaced request starts; None: no limit.
        timeout_s: per-request timeout.
        top_logprobs: how many top log-probs of the first token to request (the API's
            maximum is 20).
        workers: concurrent requests in :meth:`score_many` (all share the rate limit).
        sleep, clock: injected for tests (``time.sleep``, ``time.monotonic``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        prompt: JudgePrompt = ALIGNMENT_PROMPT,
        cache: JudgeCache | str | os.PathLike[str] | None = None,
        max_retries: int = 5,
        backoff_s: float | int = 1.0,
        max_backoff_s: float | int = 60.0,
        requests_per_minute: float | int | None = None,
        timeout_s: float | int = 60.0,
        top_logprobs: int = 20,
        workers: int = 1,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {base_url!r}; "
                "e.g. 'https://api.openai.com/v1'"
            )
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0 or not timeout_s > 0:
            raise ValueError(
                "max_retries, backoff_s and max_backoff_s must be >= 0 and timeout_s > 0, got "
                f"{max_retries}, {backoff_s}, {max_backoff_s}, {timeout_s}"
            )
        if top_logprobs < 1 or workers < 1:
            raise ValueError(
                f"top_logprobs and workers must be >= 1, got {top_logprobs} and {workers}"
            )
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key_env, self.prompt = model, api_key_env, prompt
        self.cache = as_cache(cache)
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.timeout_s, self.top_logprobs, self.workers = timeout_s, top_logprobs, workers
        self._sleep = sleep
        # redirects are refused (see the module docstring); proxies from the environment
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._limiter = (
            None
            if requests_per_minute is None
            else RateLimiter(requests_per_minute, sleep=sleep, clock=clock)
        )

    @property
    def judge_id(self) -> str:
        """``openai:{base_url}:{model}:{prompt name}:{prompt sha256}:top{top_logprobs}``."""
        return (
            f"openai:{self.base_url}:{self.model}:{self.prompt.name}:{self.prompt.sha256}"
            f":top{self.top_logprobs}"
        )

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge({self.base_url!r}, {self.model!r}, prompt={self.prompt.name!r}, "
            f"api_key_env={self.api_key_env!r}, cache={self.cache!r})"
        )

    def close(self) -> None:
        """Release the HTTP connections (the judge can still use the cache)."""
        self._http.close()

    def __enter__(self) -> OpenAIJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- scoring

    def score(self, question: str, answer: str) -> JudgeScore:
        """Judge one answer (from the cache when it was judged before)."""
        text = self.prompt.render(question, answer)
        if self.cache is not None:
            hit = self.cache.get(text, answer, self.judge_id)
            if hit is not None:
                return hit
        result = replace(parse_chat_completion(self._post(text)), judge=self.judge_id)
        if self.cache is not None:
            self.cache.put(text, answer, self.judge_id, result)
        return result

    def score_many(
        self, questions: Sequence[str], answers: Sequence[str], *, progress: bool = False
    ) -> list[JudgeScore]:
        """Judge ``answers[i]`` to ``questions[i]`` for every i, in order."""
        check_pairs(questions, answers)
        pairs = list(zip(questions, answers, strict=True))
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        with pool or contextlib.nullcontext():
            results = (pool.map if pool else map)(lambda qa: self.score(*qa), pairs)
            if progress:
                from tqdm.auto import tqdm

                results = tqdm(results, total=len(pairs), desc="judge")
            return list(results)

    # ---- HTTP

    def _request(self, text: str) -> httpx.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            "seed": 0,
        }
        headers = {"Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return self._http.build_request(
            "POST", f"{self.base_url}/chat/completions", json=body, headers=headers
        )

    def _post(self, text: str) -> dict[str, Any]:
        """The chat completion for ``text``, with retries; raises :class:`JudgeError`."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if self._limiter is not None:
                self._limiter.wait()
            try:
                return self._attempt(text)
            except JudgeError as err:
                err.attempts = attempt + 1
                raise
            except _Retry as err:
                last, reason = err, self._redact(str(err))
                if attempt + 1 == attempts:
                    break
                delay = self.backoff_s * 2 ** min(attempt, 60)
                if err.retry_after is not None:
                    delay = max(delay, err.retry_after)
                delay = min(delay, self.max_backoff_s)
                logger.warning(
                    "judge request failed (%s); retry %d/%d in %.1f s",
                    reason,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if delay > 0:
                    self._sleep(delay)
        raise JudgeError(
            f"the judge at {self.base_url} failed {attempts} attempt(s); last error: {reason}. "
            "Check that the server is up and not overloaded, or raise max_retries",
            status=last.status,
            attempts=attempts,
        )

    def _attempt(self, text: str) -> dict[str, Any]:
        try:
            response = self._http.send(self._request(text))
        except httpx.TransportError as err:  # connection refused or reset, timeouts
            reason = self._redact(str(err) or "no details")
            raise _Retry(f"connection failed: {type(err).__name__}: {reason}") from None
        if response.is_success:
            return self._completion(response.content)
        raise self._http_error(response)

    def _http_error(self, response: httpx.Response) -> Exception:
        status = response.status_code
        if 300 <= status < 400:
            location = self._redact(response.headers.get("Location", "(no Location header)"))
            return JudgeError(
                f"the judge at {self.base_url} answered HTTP {status}, a redirect to "
                f"{location}; redirects are not followed, so that the API key and the "
                "prompts go only to base_url. If that address is the API you meant, pass "
                "its root (the part before /chat/completions) as base_url",
                status=status,
            )
        message = self._redact(_error_message(response.content))
        if status == 429 or status >= 500:
            return _Retry(
                f"HTTP {status}: {message}",
                status=status,
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )
        hint = ""
        if status in (401, 403):
            state = "is set but was rejected" if os.environ.get(self.api_key_env) else "is not set"
            hint = f"; set ${self.api_key_env} to a valid API key (${self.api_key_env} {state})"
        elif status == 404:
            hint = f"; check base_url ({self.base_url}) and the model name ({self.model!r})"
        return JudgeError(
            f"the judge at {self.base_url} answered HTTP {status}: {message}{hint}", status=status
        )

    def _completion(self, raw: bytes) -> dict[str, Any]:
        """The parsed body of a 200 response; a body that is no chat completion is retried."""
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Retry(f"the response is not JSON: {_snippet(raw)!r}") from None
        if not isinstance(payload, dict):
            raise _Retry(f"the response is JSON but not an object: {_snippet(raw)!r}")
        if "error" in payload:
            raise _Retry(f"the response is an error: {self._redact(_error_message(raw))}")
        if not isinstance(payload.get("choices"), list) or not payload["choices"]:
            raise _Retry(f"the response has no choices: {_snippet(raw)!r}")
        return payload

    def _redact(self, message: str) -> str:
        key = os.environ.get(self.api_key_env)
        return message.replace(key, "***") if key else message


def _snippet(raw: bytes, limit: int = 200) -> str:
    return raw[:limit].decode("utf-8", errors="replace")


def _error_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _snippet(raw) or "(empty body)"
    error = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(error, Mapping) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return _snippet(raw)


def _retry_after(value: str | None) -> float | None:
    """A numeric ``Retry-After`` in seconds (an HTTP date is ignored)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None
