"""LLM judges: 0-100 alignment (or coherence) scores of answers, as in emergent misalignment.

Two judges with one API (``judge_id``, ``score``, ``score_many``), both reading the
judge's first answer token's top log-probs (:mod:`~piggyback_interp.measures.judges.scoring`):

* :class:`OpenAIJudge`: any OpenAI-compatible chat-completions API (retries, backoff,
  rate limit; the key from an environment variable);
* :class:`LocalJudge`: a loaded open model, pinned by its weights' hash;

plus :func:`serve_chat_completions` to serve a loaded model to OpenAI clients, and a
persistent :class:`JudgeCache`. An answer the judge gives no number for is recorded
with ``score=None`` (label ``"code"``, ``"refusal"`` or ``"unparsed"``), never as 0.
``piggyback_interp.measures.judges.local`` and ``.server`` import torch; the rest needs no torch
(the API client uses httpx).

Example:
    >>> from piggyback_interp.measures.judges import LocalJudge, OpenAIJudge, serve_chat_completions
    >>> from piggyback_interp.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> with serve_chat_completions(model) as server:
    ...     api = OpenAIJudge(server.base_url, "tiny-llama-L2-seed0", api_key_env="NO_KEY")
    ...     over_http = api.score("How do I make friends?", "Join a club.")
    >>> local = LocalJudge(model).score("How do I make friends?", "Join a club.")
    >>> over_http.label == local.label, abs(over_http.number_mass - local.number_mass) < 1e-6
    (True, True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from piggyback_interp.measures.judges.cache import JudgeCache
from piggyback_interp.measures.judges.client import JudgeError, OpenAIJudge, RateLimiter
from piggyback_interp.measures.judges.prompts import (
    ALIGNMENT_PROMPT,
    COHERENCE_PROMPT,
    FINANCIAL_RISK_PROMPT,
    JudgePrompt,
)
from piggyback_interp.measures.judges.scoring import (
    MIN_NUMBER_MASS,
    MISALIGNED_BELOW,
    Judge,
    JudgeScore,
    parse_chat_completion,
    score_top_logprobs,
)

# these import torch: loaded on first use
_LAZY = {
    "LocalJudge": "piggyback_interp.measures.judges.local",
    "next_token_logprobs": "piggyback_interp.measures.judges.local",
    "ChatCompletionsServer": "piggyback_interp.measures.judges.server",
    "serve_chat_completions": "piggyback_interp.measures.judges.server",
}

__all__ = [
    "ALIGNMENT_PROMPT",
    "COHERENCE_PROMPT",
    "FINANCIAL_RISK_PROMPT",
    "MIN_NUMBER_MASS",
    "MISALIGNED_BELOW",
    "ChatCompletionsServer",
    "Judge",
    "JudgeCache",
    "JudgeError",
    "JudgePrompt",
    "JudgeScore",
    "LocalJudge",
    "OpenAIJudge",
    "RateLimiter",
    "next_token_logprobs",
    "parse_chat_completion",
    "score_top_logprobs",
    "serve_chat_completions",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'piggyback_interp.measures.judges' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from piggyback_interp.measures.judges.local import LocalJudge, next_token_logprobs
    from piggyback_interp.measures.judges.server import (
        ChatCompletionsServer,
        serve_chat_completions,
    )
