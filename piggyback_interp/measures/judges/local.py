"""A judge run locally on a loaded open model: pinned weights, no API, no network.

:class:`LocalJudge` renders the judge prompt as one user message with the model's chat
template (generation prompt added), runs one forward per batch of prompts (left
padded, with attention mask and position ids), and scores the log-probabilities of
the first answer token exactly as an API judge's top log-probs are scored
(:func:`~piggyback_interp.measures.judges.scoring.score_top_logprobs`). The judge id names the
model and the hash of its weights, so cached results are tied to those weights.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> judge = LocalJudge(tiny_model("llama"))
    >>> judge.judge_id.startswith("local:tiny-llama-L2-seed0:alignment:")
    True
    >>> [s.label for s in judge.score_many(["What is 2 + 2?"], ["4"])]  # a random model
    ['unparsed']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from piggyback_interp.core.hf import forward_with_cache
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.core.templates import Messages
from piggyback_interp.measures.judges.cache import JudgeCache, as_cache
from piggyback_interp.measures.judges.prompts import ALIGNMENT_PROMPT, JudgePrompt
from piggyback_interp.measures.judges.scoring import JudgeScore, check_pairs, score_top_logprobs


def forward_logprobs(
    model: Any,
    input_ids: Int[Tensor, "batch new"],
    attention_mask: Int[Tensor, "batch total"],
    position_ids: Int[Tensor, "batch new"],
    cache: Any = None,
) -> tuple[Float[Tensor, "batch vocab"], Any]:
    """Next-token log-probabilities (float32, CPU) after the last position, and the KV cache.

    ``attention_mask`` covers the cached positions and the new ones; pass the returned
    cache back in to decode token by token.
    """
    with torch.no_grad():
        logits, cache = forward_with_cache(model, input_ids, attention_mask, position_ids, cache)
    return logits.float().log_softmax(-1).cpu(), cache


def next_token_logprobs(model: Any, prompts: Sequence[Messages]) -> Float[Tensor, "batch vocab"]:
    """Log-probabilities of the first reply token to each chat prompt, in one forward.

    ``prompts`` are user messages (``str``) or message lists, rendered with the model's
    chat template and its generation prompt, left padded into one batch.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> lp = next_token_logprobs(model, ["Hi", "Tell me a joke."])
        >>> lp.shape[0], bool(torch.allclose(lp.exp().sum(-1), torch.ones(2)))
        (2, True)
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list (wrap a single prompt in a list)")
    batch = batch_spans(chat_tokenizer(model), list(prompts), align="left")
    logprobs, _ = forward_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    return logprobs


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token's text, special tokens and spaces kept."""
    return tokenizer.decode(
        [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def top_tokens(
    tokenizer: Any, logprobs: Float[Tensor, " vocab"], k: int
) -> list[tuple[int, str, float]]:
    """The ``k`` most likely tokens as ``(id, text, logprob)``, most likely first."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return [
        (int(i), decode_token(tokenizer, int(i)), float(v))
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def score_logprobs(tokenizer: Any, logprobs: Float[Tensor, " vocab"], k: int) -> JudgeScore:
    """Score one first-token distribution as an API's top-``k`` log-probs would be scored."""
    top = top_tokens(tokenizer, logprobs, k)
    answer = decode_token(tokenizer, int(logprobs.argmax()))
    return score_top_logprobs([(text, lp) for _, text, lp in top], answer)


class LocalJudge:
    """Score answers with a loaded chat model as the judge.

    Args:
        model: a :class:`~transformer_lens.model_bridge.TransformerBridge` from
            :func:`~piggyback_interp.load_model` (or :func:`~piggyback_interp.testing.tiny_model`).
        prompt: the :class:`JudgePrompt`.
        cache: a :class:`JudgeCache` or a path for one; None: no cache.
        top_logprobs: how many of the most likely first tokens are read (20 as the API).
        batch_size: prompts per forward.

    The judge id is ``local:{name}:{weights sha256[:12]}:{prompt}:{prompt sha256}:top{k}``
    (without the hash when the model has none, e.g. tiny test models). It does not see
    in-memory changes to the weights: judge with a freshly loaded model.
    """

    def __init__(
        self,
        model: Any,
        *,
        prompt: JudgePrompt = ALIGNMENT_PROMPT,
        cache: JudgeCache | str | os.PathLike[str] | None = None,
        top_logprobs: int = 20,
        batch_size: int = 8,
    ) -> None:
        if top_logprobs < 1 or batch_size < 1:
            raise ValueError(
                f"top_logprobs and batch_size must be >= 1, got {top_logprobs} and {batch_size}"
            )
        self.model, self.prompt, self.cache = model, prompt, as_cache(cache)
        self.top_logprobs, self.batch_size = top_logprobs, batch_size
        self.tokenizer = chat_tokenizer(model)
        info = model_info(model)
        digest = info.sha256
        weights = "" if digest == "unknown" else f":{digest[:12]}"
        self._judge_id = (
            f"local:{info.name}{weights}:{prompt.name}:{prompt.sha256}:top{top_logprobs}"
        )

    @property
    def judge_id(self) -> str:
        """Names the model, its weights' hash, the prompt and ``top_logprobs``."""
        return self._judge_id

    def __repr__(self) -> str:
        return f"LocalJudge({self.judge_id!r}, cache={self.cache!r})"

    def score(self, question: str, answer: str) -> JudgeScore:
        """Judge one answer (from the cache when it was judged before)."""
        return self.score_many([question], [answer])[0]

    def score_many(
        self, questions: Sequence[str], answers: Sequence[str], *, progress: bool = False
    ) -> list[JudgeScore]:
        """Judge ``answers[i]`` to ``questions[i]`` for every i, in order, in batches."""
        check_pairs(questions, answers)
        texts = [self.prompt.render(q, a) for q, a in zip(questions, answers, strict=True)]
        results: list[JudgeScore | None] = [None] * len(texts)
        if self.cache is not None:
            for i, (text, answer) in enumerate(zip(texts, answers, strict=True)):
                results[i] = self.cache.get(text, answer, self.judge_id)
        todo = sorted((i for i, r in enumerate(results) if r is None), key=lambda i: len(texts[i]))
        chunks = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="judge")
        for chunk in chunks:
            logprobs = next_token_logprobs(self.model, [texts[i] for i in chunk])
            for i, row in zip(chunk, logprobs, strict=True):
                result = score_logprobs(self.tokenizer, row, self.top_logprobs)
                results[i] = replace(result, judge=self.judge_id)
                if self.cache is not None:
                    self.cache.put(texts[i], answers[i], self.judge_id, results[i])
        return [r for r in results if r is not None]
