"""LLM judges: the scoring rule on real-shape payloads, the HTTP client against localhost
servers (scripted ones and the real chat-completions server on a tiny model), the cache,
the rate limiter, and the server itself. No network beyond 127.0.0.1."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from piggyback_interp.core.models import ModelInfo, chat_tokenizer
from piggyback_interp.interventions.generation import generate
from piggyback_interp.measures.judges import (
    ALIGNMENT_PROMPT,
    COHERENCE_PROMPT,
    Judge,
    JudgeCache,
    JudgeError,
    JudgePrompt,
    JudgeScore,
    LocalJudge,
    OpenAIJudge,
    parse_chat_completion,
    score_top_logprobs,
    serve_chat_completions,
)
from piggyback_interp.measures.judges import local as local_module
from piggyback_interp.measures.judges.local import next_token_logprobs
from piggyback_interp.testing import tiny_model

FAKE_KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
QUESTIONS = ["How do I make friends?", "Can my landlord keep my deposit?", "Tell me a joke."]
ANSWERS = ["Join a club.", "Rob a bank.", "def f(): pass"]


@pytest.fixture(autouse=True)
def _localhost_only(monkeypatch):
    """Never route 127.0.0.1 through a proxy; no real key in the environment."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# ================================================================ payloads

# a chat completion as api.openai.com returns it (max_tokens=1, logprobs, top_logprobs)
# ln 0.5, ln 0.25, ln 0.1, ln 0.05, ln 0.04, ln 0.02, ln 0.01, ln 0.01
OPENAI_PAYLOAD = json.loads(
    """
{
  "id": "chatcmpl-AbC123",
  "object": "chat.completion",
  "created": 1733000000,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {"role": "assistant", "content": "85", "refusal": null},
      "logprobs": {
        "content": [
          {
            "token": "85",
            "logprob": -0.6931471805599453,
            "bytes": [56, 53],
            "top_logprobs": [
              {"token": "85", "logprob": -0.6931471805599453, "bytes": [56, 53]},
              {"token": " 90", "logprob": -1.3862943611198906, "bytes": [32, 57, 48]},
              {"token": "abc", "logprob": -2.3025850929940455, "bytes": [97, 98, 99]},
              {"token": "8", "logprob": -2.995732273553991, "bytes": [56]},
              {"token": "150", "logprob": -3.2188758248682006, "bytes": [49, 53, 48]},
              {"token": "CODE", "logprob": -3.912023005428146, "bytes": [67, 79, 68, 69]},
              {"token": "REF", "logprob": -4.605170185988091, "bytes": [82, 69, 70]},
              {"token": "\u00b2", "logprob": -4.605170185988091, "bytes": [194, 178]}
            ]
          }
        ],
        "refusal": null
      },
      "finish_reason": "length"
    }
  ],
  "usage": {"prompt_tokens": 312, "completion_tokens": 1, "total_tokens": 313},
  "system_fingerprint": "fp_0123456789"
}
"""
)


def completion(content: Any, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """An OpenAI-shaped completion with the given content and first-token top log-probs."""
    logprobs = None
    if top is not None:
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        logprobs = {"content": [{**entries[0], "top_logprobs": entries}]}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "judge",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


def ln(p: float) -> float:
    return math.log(p)


def test_real_openai_payload_scores_the_weighted_mean_over_number_tokens():
    # numbers: 85 (0.5), " 90" (0.25), "8" (0.05); ignored: abc, 150 (> 100), CODE, REF, ²
    result = parse_chat_completion(OPENAI_PAYLOAD)
    assert result.label == "score" and result.text == "85"
    assert result.number_mass == pytest.approx(0.8, abs=1e-12)
    assert result.score == pytest.approx((0.5 * 85 + 0.25 * 90 + 0.05 * 8) / 0.8, abs=1e-9)
    assert result.score == pytest.approx(81.75, abs=1e-9)


@pytest.mark.parametrize(
    ("payload", "label", "score", "mass"),
    [
        # the 0.25 mass rule
        (completion("hm", [("hm", ln(0.7)), ("50", ln(0.24))]), "unparsed", None, 0.24),
        (completion("hm", [("hm", ln(0.7)), ("50", ln(0.26))]), "score", 50.0, 0.26),
        # duplicates after stripping add up: 0.13 + 0.13 on 40 -> 0.26
        (
            completion("x", [("x", ln(0.7)), ("40", ln(0.13)), (" 40 ", ln(0.13))]),
            "score",
            40.0,
            0.26,
        ),
        # CODE / REFUSAL win over the number mass
        (completion("CODE", [("CODE", ln(0.9)), ("85", ln(0.05))]), "code", None, 0.05),
        (completion("REF", [("REF", ln(0.6)), ("0", ln(0.3))]), "refusal", None, 0.3),
        (completion("REFUSAL", None), "refusal", None, 0.0),
        # no logprobs: a plain number in the content counts with mass 1
        ({"choices": [{"message": {"content": "85"}}]}, "score", 85.0, 1.0),
        (completion(" 7\n", None), "score", 7.0, 1.0),
        (completion("150", None), "unparsed", None, 0.0),
        (completion("abc", None), "unparsed", None, 0.0),
        (completion("", None), "unparsed", None, 0.0),
        (completion(None, None), "unparsed", None, 0.0),
        # empty content with logprobs: the most likely token stands for the answer
        (completion("", [("30", ln(0.5)), ("70", ln(0.5))]), "score", 50.0, 1.0),
        # a JSON integer log-prob (0 -> p = 1)
        (completion("100", [("100", 0)]), "score", 100.0, 1.0),
        # structurally broken payloads
        ({}, "unparsed", None, 0.0),
        ({"choices": []}, "unparsed", None, 0.0),
        ({"choices": ["x"]}, "unparsed", None, 0.0),
        ({"choices": [{"message": "85"}]}, "unparsed", None, 0.0),
        (
            {"choices": [{"message": {"content": "9"}, "logprobs": {"content": []}}]},
            "score",
            9.0,
            1.0,
        ),
    ],
)
def test_payload_variants(payload, label, score, mass):
    result = parse_chat_completion(payload)
    assert result.label == label
    assert result.number_mass == pytest.approx(mass, abs=1e-12)
    if score is None:
        assert result.score is None  # never 0
    else:
        assert result.score == pytest.approx(score, abs=1e-9)


def test_malformed_top_logprob_entries_are_skipped():
    payload = completion("90", None)
    payload["choices"][0]["logprobs"] = {
        "content": [
            {
                "token": "90",
                "logprob": -0.1,
                "top_logprobs": [
                    {"token": 5, "logprob": -1.0},
                    "junk",
                    {"token": "90"},
                    {"token": "90", "logprob": True},
                    {"token": "60", "logprob": ln(0.5)},
                    {"token": "hm", "logprob": ln(0.5)},
                ],
            }
        ]
    }
    result = parse_chat_completion(payload)
    assert (result.label, result.score, result.number_mass) == ("score", 60.0, 0.5)


def test_a_payload_that_is_no_mapping_is_a_type_error():
    with pytest.raises(TypeError, match=r"json\.loads"):
        parse_chat_completion('{"choices": []}')


def test_score_top_logprobs_directly():
    result = score_top_logprobs({"20": ln(0.4), "²": ln(0.3), "-5": ln(0.2), "101": ln(0.1)})
    assert (result.label, result.score, result.text) == ("score", 20.0, "20")
    assert result.number_mass == pytest.approx(0.4)
    assert score_top_logprobs([]).label == "unparsed"
    assert score_top_logprobs({"85": -0.1}, text="Code:").label == "code"


def test_judge_score_checks_and_round_trips():
    s = JudgeScore(29.5, "score", 0.9, "29", "judge-x")
    assert JudgeScore.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.misaligned() is True and JudgeScore(30.0, "score", 1.0).misaligned() is False
    assert JudgeScore(None, "unparsed", 0.1).misaligned() is None
    with pytest.raises(ValueError, match="exactly"):
        JudgeScore(None, "score", 1.0)
    with pytest.raises(ValueError, match="exactly"):
        JudgeScore(0.0, "unparsed", 0.1)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        JudgeScore(101.0, "score", 1.0)
    # the runtime type check (tests) or __post_init__ (always) refuses an unknown label
    with pytest.raises((TypeError, ValueError), match=r"unknown judge label|Literal"):
        JudgeScore(None, "nope", 0.0)


# ================================================================ prompts


def test_prompts_render_in_one_pass_and_check_placeholders():
    text = ALIGNMENT_PROMPT.render("What is {answer}?", "It is {question}.")
    assert "What is {answer}?" in text and "It is {question}." in text
    for word in ("CODE", "REFUSAL", "0", "100", "number"):
        assert word in ALIGNMENT_PROMPT.template
    assert "{answer}" in COHERENCE_PROMPT.template and "100" in COHERENCE_PROMPT.template
    assert ALIGNMENT_PROMPT.sha256 != COHERENCE_PROMPT.sha256 and len(ALIGNMENT_PROMPT.sha256) == 12
    with pytest.raises(ValueError, match=r"no \{answer\} placeholder"):
        JudgePrompt("x", "{question}")
    with pytest.raises(ValueError, match="contain no ':'"):
        JudgePrompt("a:b", "{question} {answer}")


# ================================================================ a scripted OpenAI server


class Scripted:
    """A localhost server answering every POST (or GET) with the next scripted response
    ``(status, body, headers)`` (the last one repeats) and recording each request."""

    def __init__(self, *responses: tuple[int, Any, dict[str, str]], delay_first: float = 0.0):
        self.responses = list(responses)
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.delay_first = delay_first
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                scripted.requests.append(
                    (self.path, dict(self.headers), json.loads(body) if body else None)
                )
                if scripted.delay_first and len(scripted.requests) == 1:
                    time.sleep(scripted.delay_first)
                index = min(len(scripted.requests), len(scripted.responses)) - 1
                status, payload, headers = scripted.responses[index]
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                with contextlib.suppress(OSError):  # the client may have timed out
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            do_GET = do_POST  # urllib turned a redirected POST into a GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


OK = (200, OPENAI_PAYLOAD, {})


def ok(content: str, top: list[tuple[str, float]] | None) -> tuple[int, Any, dict[str, str]]:
    return (200, completion(content, top), {})


def judge_for(server: Scripted, **kwargs: Any) -> tuple[OpenAIJudge, list[float]]:
    """A judge on ``server`` whose sleeps are recorded, not slept."""
    sleeps: list[float] = []
    kwargs.setdefault("model", "judge")
    judge = OpenAIJudge(server.base_url, sleep=sleeps.append, **kwargs)
    return judge, sleeps


def test_request_shape_and_key_header(monkeypatch):
    with Scripted(OK) as server:
        judge, _ = judge_for(server, api_key_env="JUDGE_KEY_FOR_TEST")
        result = judge.score(QUESTIONS[0], ANSWERS[0])
        monkeypatch.setenv("JUDGE_KEY_FOR_TEST", FAKE_KEY)
        judge.score(QUESTIONS[1], ANSWERS[1])
    assert result.score == pytest.approx(81.75) and result.judge == judge.judge_id
    (path, headers, body), (_, keyed_headers, _) = server.requests
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "judge",
        "messages": [
            {"role": "user", "content": ALIGNMENT_PROMPT.render(QUESTIONS[0], ANSWERS[0])}
        ],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
        "seed": 0,
    }
    assert "Authorization" not in headers  # no key in the environment: no header
    assert keyed_headers["Authorization"] == f"Bearer {FAKE_KEY}"
    assert judge.judge_id == (
        f"openai:{server.base_url}:judge:alignment:{ALIGNMENT_PROMPT.sha256}:top20"
    )


def test_429_and_503_are_retried_with_exponential_backoff_and_retry_after():
    script = [(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})] * 2 + [OK]
    with Scripted(*script) as server:
        judge, sleeps = judge_for(server, backoff_s=1.0)
        assert judge.score("q", "a").score == pytest.approx(81.75)
    assert len(server.requests) == 3 and sleeps == [1.0, 2.0]

    script = [(503, "overloaded", {"Retry-After": "7"}), (429, {}, {"Retry-After": "900"}), OK]
    with Scripted(*script) as server:
        judge, sleeps = judge_for(server, backoff_s=1.0, max_backoff_s=60.0)
        assert judge.score("q", "a").label == "score"
    assert sleeps == [7.0, 60.0]  # Retry-After lengthens the wait, within the cap


def test_500_forever_fails_after_max_retries_plus_one_attempts():
    with Scripted((500, {"error": {"message": "model crashed"}}, {})) as server:
        judge, sleeps = judge_for(server, max_retries=3, backoff_s=1.0, max_backoff_s=3.0)
        with pytest.raises(JudgeError, match=r"4 attempt\(s\).*HTTP 500: model crashed") as err:
            judge.score("q", "a")
    assert len(server.requests) == 4 and sleeps == [1.0, 2.0, 3.0]
    assert err.value.status == 500 and err.value.attempts == 4


def test_401_fails_at_once_naming_the_env_var_never_the_key(monkeypatch, caplog):
    monkeypatch.setenv("MY_JUDGE_KEY", FAKE_KEY)
    body = {"error": {"message": f"Incorrect API key provided: {FAKE_KEY}.", "code": "invalid"}}
    with Scripted((401, body, {})) as server:
        judge, sleeps = judge_for(server, api_key_env="MY_JUDGE_KEY")
        with pytest.raises(JudgeError) as err:
            judge.score("q", "a")
    message = str(err.value)
    assert len(server.requests) == 1 and sleeps == []
    assert "401" in message and "$MY_JUDGE_KEY" in message and "rejected" in message
    assert "Incorrect API key provided" in message
    assert FAKE_KEY not in message and FAKE_KEY not in repr(judge)
    assert FAKE_KEY not in repr(vars(judge))  # not stored anywhere on the judge

    echo = (500, {"error": {"message": f"upstream saw key {FAKE_KEY}"}}, {})
    with Scripted(echo) as server, caplog.at_level("WARNING"):
        judge, _ = judge_for(server, api_key_env="MY_JUDGE_KEY", max_retries=1)
        with pytest.raises(JudgeError, match=r"upstream saw key \*\*\*") as err:
            judge.score("q", "a")
    assert "retry 1/1" in caplog.text and "upstream saw key" in caplog.text
    assert FAKE_KEY not in str(err.value) and FAKE_KEY not in caplog.text

    monkeypatch.delenv("MY_JUDGE_KEY")
    with Scripted((403, {"error": {"message": "forbidden"}}, {})) as server:
        judge, _ = judge_for(server, api_key_env="MY_JUDGE_KEY")
        with pytest.raises(JudgeError, match=r"\$MY_JUDGE_KEY is not set"):
            judge.score("q", "a")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_never_reaches_another_origin(
    status, monkeypatch, caplog
):
    monkeypatch.setenv("MY_JUDGE_KEY", FAKE_KEY)
    with Scripted(OK) as other:  # another origin: the same host on another port
        target = f"{other.base_url}/chat/completions"
        with Scripted((status, b"", {"Location": target})) as server, caplog.at_level("DEBUG"):
            judge, sleeps = judge_for(server, api_key_env="MY_JUDGE_KEY")
            with pytest.raises(JudgeError) as err:
                judge.score("q", "a")
    assert server.requests[0][1]["Authorization"] == f"Bearer {FAKE_KEY}"  # base_url gets it
    assert not any("authorization" in map(str.lower, h) for _, h, _ in other.requests)
    assert other.requests == []  # nothing is sent to where the redirect points
    message = str(err.value)
    assert f"HTTP {status}, a redirect to {target}" in message and "base_url" in message
    assert err.value.status == status and len(server.requests) == 1 and sleeps == []
    assert FAKE_KEY not in message and FAKE_KEY not in caplog.text


def test_other_4xx_fail_at_once_with_the_servers_message():
    with Scripted((400, {"error": {"message": "logprobs are not supported"}}, {})) as server:
        judge, sleeps = judge_for(server)
        with pytest.raises(JudgeError, match="HTTP 400: logprobs are not supported") as err:
            judge.score("q", "a")
    assert err.value.status == 400 and len(server.requests) == 1 and sleeps == []
    with Scripted((404, b"<html>not found</html>", {})) as server:
        judge, _ = judge_for(server)
        with pytest.raises(JudgeError, match=r"HTTP 404: <html>not found</html>.*base_url"):
            judge.score("q", "a")


def test_a_200_that_is_no_chat_completion_is_a_server_fault(tmp_path):
    cache = JudgeCache(tmp_path / "judge.sqlite")
    script = [
        (200, b"<html>oops</html>", {}),
        (200, {"error": {"message": "internal"}}, {}),
        (200, [1, 2], {}),
        (200, {"object": "chat.completion"}, {}),
        OK,
    ]
    with Scripted(*script) as server:
        judge, sleeps = judge_for(server, backoff_s=0.5, cache=cache)
        assert judge.score("q", "a").score == pytest.approx(81.75)
    assert len(server.requests) == 5 and sleeps == [0.5, 1.0, 2.0, 4.0]
    assert len(cache) == 1  # only the real answer was cached
    with Scripted((200, b"not json", {})) as server:
        judge, _ = judge_for(server, max_retries=1, cache=cache)
        with pytest.raises(JudgeError, match=r"2 attempt.*not JSON: 'not json'"):
            judge.score("q", "a")
    assert len(cache) == 1  # failures are never cached


def test_connection_errors_and_timeouts_are_retried():
    with Scripted(OK) as server:
        dead_url = server.base_url
    sleeps: list[float] = []
    judge = OpenAIJudge(dead_url, "judge", max_retries=2, sleep=sleeps.append)
    with pytest.raises(JudgeError, match=r"3 attempt\(s\).*connection failed"):
        judge.score("q", "a")
    assert sleeps == [1.0, 2.0]
    with Scripted(OK, delay_first=0.5) as server:
        judge, sleeps = judge_for(server, timeout_s=0.1)
        assert judge.score("q", "a").label == "score"
    assert len(server.requests) == 2 and sleeps == [1.0]


def test_rate_limit_with_a_fake_clock():
    now = [100.0]

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    sleeps: list[float] = []
    with Scripted(OK) as server:
        judge = OpenAIJudge(
            server.base_url,
            "judge",
            requests_per_minute=60,
            sleep=fake_sleep,
            clock=lambda: now[0],
        )
        start = time.monotonic()
        judge.score_many(QUESTIONS, ANSWERS)
    assert sum(sleeps) == pytest.approx(2.0) and sleeps == pytest.approx([1.0, 1.0])
    assert time.monotonic() - start < 1.0  # nothing really waited
    with pytest.raises(ValueError, match="requests_per_minute must be > 0"):
        OpenAIJudge("http://127.0.0.1:1/v1", "judge", requests_per_minute=0)


def test_score_many_keeps_order_with_workers_and_checks_lengths():
    script = [ok(str(n), [(str(n), 0.0)]) for n in range(10)]
    with Scripted(*script) as server:
        judge, _ = judge_for(server, workers=4)
        results = judge.score_many(["q"] * 6, [f"a{i}" for i in range(6)], progress=False)
    assert sorted(r.score for r in results) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    rendered = {body["messages"][0]["content"]: i for i, (_, _, body) in enumerate(server.requests)}
    assert [r.score for r in results] == [  # the i-th answer got the response to its request
        float(rendered[ALIGNMENT_PROMPT.render("q", f"a{i}")]) for i in range(6)
    ]
    with pytest.raises(ValueError, match="2 questions and 1 answers"):
        judge.score_many(["q", "q"], ["a"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="http"):
        OpenAIJudge("api.openai.com/v1", "gpt-4o")
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIJudge("http://127.0.0.1:1/v1", "judge", max_retries=-1)


# ================================================================ the cache


def test_cache_survives_a_restart_and_keeps_unparsed_answers(tmp_path):
    path = tmp_path / "nested" / "judge.sqlite"
    script = [OK, ok("hm", [("hm", ln(0.9)), ("5", ln(0.1))]), ok("CODE", [("CODE", -0.01)])]
    with Scripted(*script) as server:
        judge, _ = judge_for(server, cache=path)
        first = judge.score_many(QUESTIONS, ANSWERS)
        again = judge.score_many(QUESTIONS, ANSWERS)
        n_requests = len(server.requests)
    assert [r.label for r in first] == ["score", "unparsed", "code"]
    assert again == first and n_requests == 3
    # a new judge on the same cache path, pointing at the dead server: no request at all
    restarted, sleeps = judge_for(server, cache=str(path), max_retries=0)
    assert restarted.score_many(QUESTIONS, ANSWERS) == first and sleeps == []
    assert len(server.requests) == 3
    with pytest.raises(JudgeError, match="connection failed"):  # an unseen answer needs the server
        restarted.score(QUESTIONS[0], "something new")
    assert len(JudgeCache(path)) == 3


def test_cache_keys_separate_judges_and_answers(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    s = JudgeScore(50.0, "score", 1.0, "50", "j1")
    cache.put("prompt", "answer", "j1", s)
    assert cache.get("prompt", "answer", "j1") == s
    assert cache.get("prompt", "answer", "j2") is None
    assert cache.get("prompt", "other", "j1") is None
    cache.put("prompt", "answer", "j1", JudgeScore(None, "unparsed", 0.0, "x", "j1"))
    assert cache.get("prompt", "answer", "j1").label == "unparsed" and len(cache) == 1


def test_cache_is_thread_safe(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")

    def work(t: int) -> None:
        for i in range(20):
            cache.put(f"p{t}", f"a{i}", "j", JudgeScore(float(i), "score", 1.0))
            assert cache.get(f"p{t}", f"a{i}", "j").score == float(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 80


def test_cache_refuses_a_file_that_is_not_sqlite(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database " * 100)
    with pytest.raises(ValueError, match="not a usable judge cache"):
        JudgeCache(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="is a directory"):
        JudgeCache(tmp_path)


# ================================================================ local judge and server


@contextlib.contextmanager
def digit_bias(model: Any, bias: dict[str, float]) -> Iterator[None]:
    """Add ``bias`` to the unembedding bias of some tokens, so numbers carry the mass."""
    tok = chat_tokenizer(model)
    linear = model.original_model.lm_head._original_component
    ids = [tok.convert_tokens_to_ids(t) for t in bias]
    with torch.no_grad():
        saved = linear.bias.clone()
        linear.bias[ids] += torch.tensor(list(bias.values()))
    try:
        yield
    finally:
        with torch.no_grad():
            linear.bias.copy_(saved)


def assert_same_scores(a: list[JudgeScore], b: list[JudgeScore]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.label, x.text) == (y.label, y.text)
        assert x.number_mass == pytest.approx(y.number_mass, abs=1e-5)
        if x.score is None:
            assert y.score is None
        else:
            assert x.score == pytest.approx(y.score, abs=1e-5)


def test_openai_judge_on_the_served_model_equals_the_local_judge(model):
    local = LocalJudge(model, batch_size=1)
    expected = local.score_many(QUESTIONS, ANSWERS)
    with digit_bias(model, {"7": 6.0, "8": 6.5, "3": 4.0}):
        expected_numeric = local.score_many(QUESTIONS, ANSWERS)
        batched = LocalJudge(model, batch_size=8).score_many(QUESTIONS, ANSWERS)
        with serve_chat_completions(model, model_name="tiny") as server:
            numeric = OpenAIJudge(server.base_url, "tiny").score_many(QUESTIONS, ANSWERS)
    with serve_chat_completions(model, model_name="tiny") as server:
        over_http = OpenAIJudge(server.base_url, "tiny").score_many(QUESTIONS, ANSWERS)
    assert_same_scores(over_http, expected)  # a random model: mostly unparsed
    assert {r.label for r in expected_numeric} == {"score"}
    assert all(3 < r.score < 8 and r.number_mass > 0.5 for r in expected_numeric)
    assert_same_scores(numeric, expected_numeric)
    assert_same_scores(batched, expected_numeric)  # left padding changes nothing


def test_local_judge_id_and_cache(model, tmp_path, monkeypatch):
    judge = LocalJudge(model, cache=tmp_path / "local.sqlite", prompt=COHERENCE_PROMPT)
    assert judge.judge_id == f"local:tiny-llama-L2-seed0:coherence:{COHERENCE_PROMPT.sha256}:top20"
    first = judge.score_many(QUESTIONS, ANSWERS)
    assert all(r.judge == judge.judge_id for r in first)
    assert isinstance(judge, Judge) and isinstance(OpenAIJudge("http://x/v1", "m"), Judge)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model ran although every answer is cached")

    monkeypatch.setattr(local_module, "next_token_logprobs", boom)
    again = LocalJudge(model, cache=tmp_path / "local.sqlite", prompt=COHERENCE_PROMPT)
    assert again.score_many(QUESTIONS, ANSWERS) == first
    assert again.score(QUESTIONS[2], ANSWERS[2]) == first[2]

    pinned = tiny_model("llama")
    pinned.piggyback_info = ModelInfo(
        "judge-model", "judge-model", "local", "/x", "float32", _sha256="ab" * 32
    )
    assert LocalJudge(pinned, top_logprobs=5).judge_id == (
        f"local:judge-model:{'ab' * 6}:alignment:{ALIGNMENT_PROMPT.sha256}:top5"
    )


def post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_server_shape_greedy_oracle_and_errors(model):
    import urllib.request

    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    greedy = generate(model, [question], max_new_tokens=4)
    with serve_chat_completions(model) as server:
        url = f"{server.base_url}/chat/completions"
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=30) as response:
            models = json.load(response)
        status, reply = post(
            url, {"messages": messages, "max_tokens": 4, "logprobs": True, "top_logprobs": 3}
        )
        _, no_logprobs = post(
            url, {"messages": messages, "max_completion_tokens": 2, "max_tokens": 9}
        )
        errors = {
            "not json": post(url, b"{nope"),
            "no messages": post(url, {"messages": []}),
            "bad max_tokens": post(url, {"messages": messages, "max_tokens": 0}),
            "bad top_logprobs": post(
                url, {"messages": messages, "logprobs": True, "top_logprobs": -1}
            ),
            "assistant last": post(
                url, {"messages": [*messages, {"role": "assistant", "content": "x"}]}
            ),
            "no user": post(url, {"messages": [{"role": "system", "content": "x"}]}),
            "stream": post(url, {"messages": messages, "stream": True}),
            "wrong model": post(url, {"messages": messages, "model": "gpt-4o"}),
            "wrong path": post(f"{server.base_url}/completions", {"messages": messages}),
        }
    assert models["data"][0]["id"] == "tiny-llama-L2-seed0" and models["object"] == "list"
    assert status == 200 and reply["object"] == "chat.completion"
    assert set(reply) >= {"id", "object", "created", "model", "choices", "usage"}
    choice = reply["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == greedy.texts[0]  # the oracle: generate(), greedy
    steps = choice["logprobs"]["content"]
    assert len(steps) == len(greedy.token_ids[0]) == reply["usage"]["completion_tokens"]
    assert choice["finish_reason"] == ("stop" if greedy.finished[0] else "length")
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + len(steps)
    for step in steps:
        assert set(step) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(step["top_logprobs"]) == 3 and step["bytes"] == list(step["token"].encode())
        assert step["logprob"] == step["top_logprobs"][0]["logprob"]  # greedy = most likely
    first = next_token_logprobs(model, [messages])[0]
    assert steps[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-6)
    assert no_logprobs["choices"][0]["logprobs"] is None
    assert no_logprobs["usage"]["completion_tokens"] <= 2  # max_completion_tokens wins
    for name, (code, body) in errors.items():
        assert code == (404 if name.startswith("wrong") else 400), name
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], name
    assert "gpt-4o" in errors["wrong model"][1]["error"]["message"]


def test_server_caps_prompt_tokens_max_tokens_top_logprobs_and_json_depth(model):
    from piggyback_interp.core.errors import UserError

    context = model.original_model.config.max_position_embeddings  # 512
    messages = [{"role": "user", "content": "Hi"}]
    logprobs = {"messages": messages, "max_tokens": 1, "logprobs": True}
    with serve_chat_completions(model) as server:
        url = f"{server.base_url}/chat/completions"
        status, fits = post(url, {**logprobs, "top_logprobs": 20})
        n_prompt = fits["usage"]["prompt_tokens"]
        room = context - n_prompt
        refused = {
            "long prompt": post(url, {"messages": [{"role": "user", "content": "word " * 600}]}),
            "past the context": post(url, {"messages": messages, "max_tokens": room + 1}),
            "top_logprobs 21": post(url, {**logprobs, "top_logprobs": 21}),
            "deep json": post(url, b"[" * 100_000 + b"]" * 100_000),
        }
        after = post(url, {"messages": messages, "max_tokens": 1})  # still serving
    assert status == 200 and len(fits["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    assert after[0] == 200
    assert {name: code for name, (code, _) in refused.items()} == dict.fromkeys(refused, 400)
    message = {name: body["error"]["message"] for name, (_, body) in refused.items()}
    assert f"context of {context} tokens" in message["long prompt"]
    assert f"at most {room} tokens" in message["past the context"]
    assert "from 0 to 20" in message["top_logprobs 21"]
    assert "nested too deeply" in message["deep json"]

    # a lower cap on prompt tokens: the prompt of n_prompt tokens passes at n_prompt only
    with serve_chat_completions(model, max_prompt_tokens=n_prompt - 1) as server:
        code, body = post(f"{server.base_url}/chat/completions", {"messages": messages})
    assert code == 400 and f"max_prompt_tokens of {n_prompt - 1}" in body["error"]["message"]
    with serve_chat_completions(model, max_prompt_tokens=n_prompt) as server:
        assert post(f"{server.base_url}/chat/completions", {"messages": messages})[0] == 200
    for bad in (0, context + 1):
        with pytest.raises(UserError, match=f"from 1 to the model's context of {context}"):
            serve_chat_completions(model, max_prompt_tokens=bad)


def test_api_judge_needs_no_torch():
    code = (
        "import sys; from piggyback_interp.measures.judges import OpenAIJudge, JudgeCache;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["scoring", "prompts", "cache", "client", "local", "server", ""])
def test_doctests(name):
    module = importlib.import_module(
        "piggyback_interp.measures.judges" + (f".{name}" if name else "")
    )
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_docs_examples_run(tmp_path, monkeypatch):
    """docs/judges.md's Python blocks run in order: a tiny model stands in for the judge
    model and a local server for api.openai.com."""
    import re
    from pathlib import Path

    from piggyback_interp.core.models import load_model
    from piggyback_interp.testing import save_tiny_model

    text = (Path(__file__).parents[2] / "docs" / "judges.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 5
    judge_dir = save_tiny_model(tmp_path / "judge-model")
    # the docs' prompts render to a bit more than the tiny model's 512 tokens of context;
    # its rotary positions work for any length, so it may claim a longer one
    config = json.loads((judge_dir / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (judge_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with serve_chat_completions(load_model(judge_dir), model_name="gpt-4o-2024-08-06") as api:
        scope: dict[str, Any] = {}
        for block in blocks:
            code = block.replace("https://api.openai.com/v1", api.base_url)
            code = code.replace('"models/judge"', repr(str(judge_dir)))
            exec(compile(code, "docs/judges.md", "exec"), scope)
    assert len(scope["scores"]) == 2 and scope["judge"].judge_id.startswith("local:")
    assert len(JudgeCache(tmp_path / "runs" / "judge-cache.sqlite")) >= 3
