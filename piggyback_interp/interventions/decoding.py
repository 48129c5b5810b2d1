"""Token-by-token decoding over a prompt's KV cache, without hooks: greedy or
temperature / top-p sampling, each prompt drawing from its own seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from piggyback_interp.core.hf import forward_with_cache
from piggyback_interp.core.spans import ChatBatch


def pad_id(tokenizer: Any) -> int:
    """The id that fills a finished row: the pad token, else EOS, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def greedy(logits: Float[Tensor, "batch vocab"], rows: list[int]) -> Int[Tensor, " batch"]:
    return logits.argmax(-1)


class Sampler:
    """Temperature / top-p sampling; prompt ``i`` draws from its own seeded generator."""

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.generators: dict[int, torch.Generator] = {}

    def _generator(self, row: int) -> torch.Generator:
        if row not in self.generators:
            state = np.random.SeedSequence([self.seed, row]).generate_state(1)[0]
            self.generators[row] = torch.Generator().manual_seed(int(state))
        return self.generators[row]

    def __call__(
        self, logits: Float[Tensor, "batch vocab"], rows: list[int]
    ) -> Int[Tensor, " batch"]:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        if self.top_p < 1:
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
            sorted_probs = sorted_probs * (before < self.top_p)
        cdf = sorted_probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=self._generator(r)) for r in rows])
        u = u.to(cdf.device)[:, None] * cdf[:, -1:]
        k = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)
        return order.gather(-1, k)[:, 0]


class Decoder:
    """Token-by-token decoding over a prompt cache, without hooks."""

    def __init__(
        self,
        model: Any,
        *,
        max_new_tokens: int,
        pick: Callable[[Tensor, list[int]], Tensor],
        eos_ids: Sequence[int],
        pad_id: int,
    ) -> None:
        self.model, self.max_new_tokens, self.pick = model, max_new_tokens, pick
        self.eos_ids, self.pad_id = tuple(eos_ids), pad_id

    def __call__(
        self, logits: Float[Tensor, "batch vocab"], cache: Any, batch: ChatBatch, rows: list[int]
    ) -> list[tuple[list[int], bool]]:
        device = logits.device
        mask = batch.attention_mask.to(device)
        position = mask.sum(-1, keepdim=True)  # the next token's position in every row
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        steps: list[Tensor] = []
        for step in range(self.max_new_tokens):
            token = self.pick(logits, rows).masked_fill(done, self.pad_id)
            steps.append(token)
            done |= torch.isin(token, eos)
            if step == self.max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = forward_with_cache(self.model, token[:, None], mask, position, cache)
            position = position + 1
        return [self._cut(ids) for ids in torch.stack(steps, dim=1).tolist()]

    def _cut(self, ids: list[int]) -> tuple[list[int], bool]:
        at = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        return (ids, False) if at is None else (ids[:at], True)
