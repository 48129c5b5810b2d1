"""Serve a loaded model over an OpenAI-compatible chat-completions API, on localhost.

A pinned open judge can then be used by any OpenAI client, :class:`OpenAIJudge`
included. Served (on a background daemon thread, one request at a time on the model):

* ``POST /v1/chat/completions``: greedy decoding (``temperature``, ``seed`` and the
  like are accepted and ignored) of at most ``max_completion_tokens`` /
  ``max_tokens`` tokens (default 16, or what the context has left), stopping at the
  model's EOS; with ``"logprobs": true`` the log-prob of every generated token and its
  ``top_logprobs`` (0 to 20, as in the OpenAI API) most likely alternatives (``bytes``
  are the UTF-8 bytes of each token's decoded text). Messages are rendered with the
  model's chat template.
* ``GET /v1/models``: the one served model.

Limits, each answered with HTTP 400 and a message that says what to change: a body of
at most 16 MiB (413 beyond), JSON nested no deeper than Python's parser takes, a
prompt of at most ``max_prompt_tokens`` tokens (default: the model's context,
``max_position_embeddings``), and prompt plus ``max_tokens`` within the context.
A malformed request gets HTTP 400 with ``{"error": {"message": ...}}``; another model
name gets 404. There is no authentication: keep the default ``host="127.0.0.1"``.

Example:
    >>> import json, urllib.request
    >>> from piggyback_interp.testing import tiny_model
    >>> with serve_chat_completions(tiny_model("llama"), model_name="tiny") as server:
    ...     request = urllib.request.Request(
    ...         f"{server.base_url}/chat/completions",
    ...         data=json.dumps({"messages": [{"role": "user", "content": "Hi"}],
    ...                          "max_tokens": 3}).encode())
    ...     reply = json.load(urllib.request.urlopen(request))
    >>> reply["object"], reply["model"], reply["usage"]["completion_tokens"] <= 3
    ('chat.completion', 'tiny', True)
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hf import eos_token_ids
from piggyback_interp.core.models import chat_tokenizer, context_length, model_info
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.judges.local import decode_token, forward_logprobs, top_tokens

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 16 * 2**20
MAX_TOP_LOGPROBS = 20  # as in the OpenAI API


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ChatCompletionsServer:
    """An OpenAI-style chat-completions server for one model (see the module docstring).

    The socket is bound on construction (``port=0`` picks a free port); :meth:`start`
    serves on a daemon thread, :meth:`close` stops. Use it as a context manager, or
    through :func:`serve_chat_completions`. :meth:`complete` answers one request body
    without HTTP. ``max_prompt_tokens`` caps the rendered prompt below the model's
    context (``context``, its ``max_position_embeddings``); None: the whole context.
    """

    def __init__(
        self,
        model: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.model_name = model_name or model_info(model).name
        self.tokenizer = chat_tokenizer(model)
        self.context = context_length(model) or max_prompt_tokens
        if self.context is None:
            raise UserError(
                "the model's config names no context length (max_position_embeddings); "
                "pass max_prompt_tokens"
            )
        if max_prompt_tokens is not None and not (
            _is_int(max_prompt_tokens) and 1 <= max_prompt_tokens <= self.context
        ):
            raise UserError(
                f"max_prompt_tokens must be an integer from 1 to the model's context of "
                f"{self.context} tokens, got {max_prompt_tokens!r}; leave it out to allow "
                "the whole context"
            )
        self.max_prompt_tokens = max_prompt_tokens or self.context
        self._lock = threading.Lock()
        handler = type("_BoundHandler", (_Handler,), {"app": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: what an OpenAI client takes as its base URL."""
        host, port = self._httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/v1"

    def __repr__(self) -> str:
        return f"ChatCompletionsServer({self.model_name!r}, base_url={self.base_url!r})"

    def start(self) -> ChatCompletionsServer:
        """Serve on a background daemon thread (returns self)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},  # how soon close() returns
                name="chat-completions",
                daemon=True,
            )
            self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Block until the server is closed (e.g. to serve from a script until Ctrl-C)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ChatCompletionsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the API

    def models(self) -> dict[str, Any]:
        """The body of ``GET /v1/models``."""
        entry = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "local"}
        return {"object": "list", "data": [entry]}

    def complete(self, request: Any) -> dict[str, Any]:
        """The body of ``POST /v1/chat/completions`` for a parsed request body.

        Raises :class:`RequestError` for a malformed request.
        """
        messages, max_tokens, top_k = self._parse(request)
        with self._lock:  # one request at a time on the model and its tokenizer
            try:
                batch = batch_spans(self.tokenizer, [messages], align="left")
            except ValueError as err:
                raise RequestError(f"cannot render these messages: {err}") from err
            max_tokens = self._fit(batch.input_ids.shape[1], max_tokens)
            ids, steps, finish = self._greedy(batch, max_tokens, top_k)
            content = self.tokenizer.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish,
            "logprobs": None if top_k is None else {"content": steps},
        }
        n_prompt = batch.input_ids.shape[1]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": len(ids),
                "total_tokens": n_prompt + len(ids),
            },
        }

    def _fit(self, n_prompt: int, max_tokens: int | None) -> int:
        """``max_tokens`` (None: the default, within the context) once the prompt and
        the answer are known to fit; raises :class:`RequestError` when they do not."""
        if n_prompt > self.max_prompt_tokens:
            cap = (
                f"the model's context of {self.context} tokens"
                if self.max_prompt_tokens == self.context
                else f"this server's max_prompt_tokens of {self.max_prompt_tokens}"
            )
            raise RequestError(
                f"the messages render to {n_prompt} tokens, more than {cap}; shorten them"
            )
        room = self.context - n_prompt
        if room < 1:
            raise RequestError(
                f"the messages render to {n_prompt} tokens, which fill the model's context "
                f"of {self.context} tokens and leave no room for an answer. Shorten the messages"
            )
        if max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise RequestError(
                f"max_tokens={max_tokens} and the {n_prompt} prompt tokens exceed the model's "
                f"context of {self.context} tokens; ask for at most {room} tokens, or shorten "
                "the messages"
            )
        return max_tokens

    def _parse(self, request: Any) -> tuple[list[dict[str, str]], int | None, int | None]:
        """(messages, max_tokens or None for the default, top_logprobs or None when no
        logprobs were asked for)."""
        if not isinstance(request, Mapping):
            raise RequestError("the request body must be a JSON object")
        model = request.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                status=404,
            )
        if request.get("stream"):
            raise RequestError("streaming is not supported; send stream=false")
        if request.get("n", 1) != 1:
            raise RequestError("only n=1 is supported (decoding is greedy)")
        max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        logprobs = request.get("logprobs", False)
        if not isinstance(logprobs, bool):
            raise RequestError(f"logprobs must be true or false, got {logprobs!r}")
        top_k = request.get("top_logprobs")
        top_k = 0 if top_k is None else top_k
        if not _is_int(top_k) or not 0 <= top_k <= MAX_TOP_LOGPROBS:
            raise RequestError(
                f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (as in the "
                f"OpenAI API), got {top_k!r}"
            )
        return _messages(request.get("messages")), max_tokens, top_k if logprobs else None

    def _greedy(
        self, batch: Any, max_tokens: int, top_k: int | None
    ) -> tuple[list[int], list[dict[str, Any]], str]:
        """Greedy token ids (EOS cut), their logprob entries, and the finish reason."""
        eos = set(eos_token_ids(self.model, self.tokenizer))
        mask, positions = batch.attention_mask, batch.position_ids
        logprobs, cache = forward_logprobs(self.model, batch.input_ids, mask, positions)
        next_position = mask.sum(-1, keepdim=True)
        ids: list[int] = []
        steps: list[dict[str, Any]] = []
        for _ in range(max_tokens):
            token = int(logprobs[0].argmax())
            if token in eos:
                return ids, steps, "stop"
            ids.append(token)
            if top_k is not None:
                steps.append(self._logprob_entry(logprobs[0], token, top_k))
            if len(ids) == max_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = torch.tensor([[token]], dtype=torch.long)
            logprobs, cache = forward_logprobs(self.model, step, mask, next_position, cache)
            next_position = next_position + 1
        return ids, steps, "length"

    def _logprob_entry(
        self, logprobs: Float[Tensor, " vocab"], token: int, top_k: int
    ) -> dict[str, Any]:
        def entry(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        top = [entry(text, lp) for _, text, lp in top_tokens(self.tokenizer, logprobs, top_k)]
        chosen = entry(decode_token(self.tokenizer, token), float(logprobs[token]))
        return {**chosen, "top_logprobs": top}


def serve_chat_completions(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    max_prompt_tokens: int | None = None,
) -> ChatCompletionsServer:
    """Start serving ``model`` (see :class:`ChatCompletionsServer`); use it in a ``with``.

    ``port=0`` picks a free port (read ``server.base_url``); ``model_name`` defaults to
    the model's name in :func:`~piggyback_interp.model_info`; ``max_prompt_tokens``
    caps prompts below the model's context.
    """
    return ChatCompletionsServer(
        model, host=host, port=port, model_name=model_name, max_prompt_tokens=max_prompt_tokens
    ).start()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages as ``{"role", "content"}`` dicts with string content."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            parts = [p.get("text") for p in content if isinstance(p, Mapping)]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise RequestError(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        out.append({"role": message["role"], "content": content})
    if out[-1]["role"] != "user":
        raise RequestError(
            f"the last message has role {out[-1]['role']!r}; it must be the user's message "
            "that the model answers"
        )
    return out


class _Handler(BaseHTTPRequestHandler):
    app: ChatCompletionsServer
    server_version = "piggyback-interp"

    def do_GET(self) -> None:
        if self._route() == "/v1/models":
            self._send(200, self.app.models())
        else:
            self._send_error(404, f"no route GET {self.path}; try /v1/models")

    def do_POST(self) -> None:
        if self._route() != "/v1/chat/completions":
            self._send_error(404, f"no route POST {self.path}; try /v1/chat/completions")
            return
        try:
            request = self._read_json()
            self._send(200, self.app.complete(request))
        except RequestError as err:
            self._send_error(err.status, str(err))
        except Exception as err:  # the model failed: say so, keep serving
            logger.exception("chat completion failed")
            self._send_error(500, f"the model failed: {type(err).__name__}: {err}")

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("send a Content-Length header with the JSON body", 411) from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise RequestError(f"the body must be at most {MAX_BODY_BYTES} bytes", 413)
        try:
            return json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(f"the body is not valid JSON: {err}") from None
        except RecursionError:
            raise RequestError("the body's JSON is nested too deeply; flatten it") from None

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - " + format, self.address_string(), *args)
