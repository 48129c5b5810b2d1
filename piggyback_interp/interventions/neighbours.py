"""The tokens a perturbed token may be replaced by (:mod:`.perturb`).

``mode="nearest"`` draws from a token's nearest neighbours in the input embedding
(:func:`nearest_neighbours`, cosine, computed in blocks so a 128k vocabulary never needs a
vocab x vocab matrix); ``mode="random"`` from every vocabulary token. Special tokens
(:func:`special_token_ids`) are never candidates.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from piggyback_interp.core.checks import require_positive
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hf import input_embedding


def nearest_neighbours(
    embedding: Float[Tensor, "vocab d_model"],
    token_ids: Int[Tensor, " n"],
    *,
    top_k: int = 5,
    exclude: Collection[int] = (),
    chunk_size: int = 4096,
) -> Int[Tensor, "n top_k"]:
    """The ``top_k`` nearest tokens of each of ``token_ids`` by cosine similarity.

    A token is never its own neighbour and ids in ``exclude`` (e.g. special tokens) are
    never returned; excluded ids outside the vocabulary are ignored. Rows are sorted by
    similarity, ties go to the lower id. The similarity is computed in float32 in blocks
    of ``chunk_size`` queries x ``chunk_size`` vocabulary rows, so a 128k vocabulary never
    needs a vocab x vocab matrix (nor a normalised copy of the whole embedding). The
    result is a LongTensor on ``embedding``'s device.

    Example:
        >>> emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
        >>> nearest_neighbours(emb, torch.tensor([0, 2]), top_k=2).tolist()
        [[1, 2], [1, 0]]
        >>> nearest_neighbours(emb, torch.tensor([0]), top_k=2, exclude={1}).tolist()
        [[2, 3]]
    """
    require_positive(top_k=top_k, chunk_size=chunk_size)
    vocab = embedding.shape[0]
    ids = token_ids.to(device=embedding.device, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"token_ids must be vocabulary ids in [0, {vocab}), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    banned = torch.zeros(vocab, dtype=torch.bool, device=embedding.device)
    inside = [int(i) for i in exclude if 0 <= int(i) < vocab]
    banned[inside] = True
    _require_candidates(banned, ids, top_k)
    with torch.no_grad():
        blocks = [
            _top_k_block(embedding, ids[start : start + chunk_size], banned, top_k, chunk_size)
            for start in range(0, len(ids), chunk_size)
        ]
    if not blocks:
        return torch.empty(0, top_k, dtype=torch.long, device=embedding.device)
    return torch.cat(blocks)


def _require_candidates(banned: Tensor, ids: Tensor, top_k: int) -> None:
    if not ids.numel():
        return
    allowed = int((~banned).sum())
    fewest = allowed - int((~banned[ids]).any())  # a query never counts itself
    if fewest < top_k:
        raise UserError(
            f"only {fewest} candidate tokens remain after excluding the token itself and "
            f"{int(banned.sum())} excluded ids, fewer than top_k={top_k}; pass a smaller top_k"
        )


def _top_k_block(
    embedding: Tensor, ids: Tensor, banned: Tensor, top_k: int, chunk_size: int
) -> Tensor:
    """Running top-k over vocabulary blocks; a stable sort keeps lower ids first on ties."""
    queries = F.normalize(embedding[ids].float(), dim=-1)
    best_sims = queries.new_empty(len(ids), 0)
    best_ids = ids.new_empty(len(ids), 0)
    for start in range(0, embedding.shape[0], chunk_size):
        stop = min(start + chunk_size, embedding.shape[0])
        columns = torch.arange(start, stop, device=embedding.device)
        sims = queries @ F.normalize(embedding[start:stop].float(), dim=-1).T
        sims[:, banned[start:stop]] = -math.inf
        sims[ids[:, None] == columns[None, :]] = -math.inf
        all_sims = torch.cat([best_sims, sims], dim=1)
        all_ids = torch.cat([best_ids, columns.expand(len(ids), -1)], dim=1)
        order = torch.sort(all_sims, dim=1, descending=True, stable=True).indices[:, :top_k]
        best_sims, best_ids = all_sims.gather(1, order), all_ids.gather(1, order)
    return best_ids


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """``tokenizer.all_special_ids`` plus every added token marked special.

    The second part catches e.g. Llama-3's ``<|reserved_special_token_*|>``, which are
    special added tokens but not in ``all_special_ids``.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> sorted(special_token_ids(tiny_tokenizer()))
        [0, 1, 2]
    """
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    flagged = {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return frozenset({int(i) for i in tokenizer.all_special_ids} | flagged)


def neighbour_table(
    embedding: Tensor, originals: list[int], tokenizer: PreTrainedTokenizerBase, top_k: int
) -> dict[int, Sequence[int]]:
    """Each original token's ``top_k`` nearest neighbours, never a special token nor an
    embedding row past ``len(tokenizer)`` (padding rows)."""
    size = len(tokenizer)
    if embedding.shape[0] < size:
        raise ValueError(
            f"the embedding has {embedding.shape[0]} rows but the tokenizer has {size} "
            "tokens; pass the input embedding of the model this tokenizer belongs to"
        )
    exclude = set(special_token_ids(tokenizer)) | set(range(size, embedding.shape[0]))
    ids = torch.tensor(originals, dtype=torch.long)
    neighbours = nearest_neighbours(embedding, ids, top_k=top_k, exclude=exclude)
    return dict(zip(originals, neighbours.tolist(), strict=True))


def random_table(
    originals: list[int], tokenizer: PreTrainedTokenizerBase
) -> dict[int, Sequence[int]]:
    """Each original token's candidates for ``mode="random"``: every non-special token."""
    special = special_token_ids(tokenizer)
    allowed = [i for i in range(len(tokenizer)) if i not in special]
    if len(allowed) < 2:
        raise ValueError("the tokenizer has fewer than 2 non-special tokens to draw from")
    return dict.fromkeys(originals, allowed)


def embedding_of(model_or_tokenizer: Any, embedding: Tensor | None) -> Tensor:
    """``embedding`` if given, else the model's input embedding (``W_E``, else the HF one)."""
    if embedding is not None:
        return embedding.detach()
    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        raise ValueError(
            "mode='nearest' needs the input embedding, and a tokenizer has none: pass the "
            "model instead of its tokenizer, or embedding=model.W_E, or use mode='random'"
        )
    try:
        return model_or_tokenizer.W_E.detach()
    except AttributeError:
        pass
    weight = input_embedding(model_or_tokenizer)
    if weight is None:
        raise ValueError(
            "cannot find the model's input embedding (no W_E, no original_model); "
            "pass embedding= explicitly"
        )
    return weight.detach()
