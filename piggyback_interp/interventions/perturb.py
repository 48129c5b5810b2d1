"""Token perturbations of one chat-template segment (arXiv 2606.06667, section 4.1).

The paper's prefix perturbation replaces 10 random tokens of ONE segment, each by one
of its top-5 nearest neighbours in the input-embedding matrix (cosine similarity),
10 trials per prompt, and reports the best and the average trial. Perturbing the
same number of tokens in the query or the postfix is the control. ``mode="random"``
replaces the tokens by uniformly random vocabulary tokens instead.

Example:
    >>> from piggyback_interp.core.models import chat_tokenizer
    >>> from piggyback_interp.core.spans import chat_spans
    >>> from piggyback_interp.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> spans = chat_spans(chat_tokenizer(model), "What is the capital of France?")
    >>> trials = perturb_segment(model, spans, "prefix", n_tokens=3, trials=2, seed=0)
    >>> len(trials), trials[0].n_tokens, trials[0].segment
    (2, 3, 'prefix')
    >>> all(p in spans.prefix for t in trials for p in t.positions)
    True
    >>> side_by_side = perturb_segments(model, spans, trials=2)  # matched token counts
    >>> sorted({t.n_tokens for ts in side_by_side.values() for t in ts})
    [6]
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from piggyback_interp.core.checks import Choice, require_positive
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.spans import ChatSpans, require_segment
from piggyback_interp.interventions.neighbours import (
    embedding_of,
    neighbour_table,
    random_table,
    special_token_ids,
)

PERTURB_SEGMENTS: tuple[str, ...] = ("prefix", "query", "postfix")


class PerturbMode(Choice):
    """How a perturbed token is replaced: an embedding ``nearest`` neighbour, or ``random``."""

    NEAREST = "nearest"
    RANDOM = "random"


MODES: tuple[str, ...] = PerturbMode.values()


# --- perturbations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Perturbation:
    """One perturbed prompt: which positions changed, from what, to what.

    ``input_ids`` is the whole prompt with the replacements; ``positions`` are sorted and
    ``original[i]`` / ``replacement[i]`` belong to ``positions[i]``. ``n_tokens`` is the
    number actually perturbed (fewer than asked when the segment is shorter).

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> p = Perturbation((1, 5, 9), (1,), (5,), (6,), "prefix", 0, "nearest")
        >>> p.n_tokens, p.ids.tolist()
        (1, [1, 5, 9])
        >>> p.describe(tok).startswith("pos 1 ")
        True
    """

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    original: tuple[int, ...]
    replacement: tuple[int, ...]
    segment: str
    trial: int
    mode: str

    @property
    def ids(self) -> Int[Tensor, " pos"]:
        """``input_ids`` as a 1-D LongTensor (feed ``p.ids[None]`` to the model)."""
        return torch.tensor(self.input_ids, dtype=torch.long)

    @property
    def n_tokens(self) -> int:
        """How many tokens were replaced."""
        return len(self.positions)

    def describe(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """Each replacement as ``pos 5 'system'→'System'``, joined by ``"; "``."""

        def text(token_id: int) -> str:
            return repr(tokenizer.decode([token_id], clean_up_tokenization_spaces=False))

        return "; ".join(
            f"pos {pos} {text(old)}→{text(new)}"
            for pos, old, new in zip(self.positions, self.original, self.replacement, strict=True)
        )


def perturbable_positions(
    spans: ChatSpans,
    segment: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    exclude_special: bool = True,
    positions: Sequence[int] | None = None,
) -> list[int]:
    """The positions :func:`perturb_segment` draws from (sorted).

    The positions of ``segment`` (or ``positions`` when given), without the positions
    holding special tokens when ``exclude_special``.

    Example:
        >>> from piggyback_interp.core.spans import chat_spans
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> spans = chat_spans(tok, "Hi")
        >>> spans.tokens(tok)[spans.postfix.start : spans.postfix.stop]
        ['<|im_end|>', 'Ċ', '<|im_start|>', 'a', 'ss', 'istan', 't', 'Ċ']
        >>> [p - spans.postfix.start for p in perturbable_positions(spans, "postfix", tok)]
        [1, 3, 4, 5, 6, 7]
    """
    pool = _explicit_positions(spans, positions) if positions is not None else None
    if pool is None:
        if segment not in PERTURB_SEGMENTS:
            raise ValueError(
                f"unknown segment {segment!r}; choose one of {PERTURB_SEGMENTS}, or pass "
                "positions=[...] to perturb other positions"
            )
        pool = list(require_segment(spans, segment))
    if not exclude_special:
        return pool
    special = special_token_ids(tokenizer)
    kept = [pos for pos in pool if spans.input_ids[pos] not in special]
    if not kept:
        where = "the given positions" if positions is not None else f"segment {segment!r}"
        raise UserError(
            f"{where} has no perturbable positions: all {len(pool)} of its tokens are "
            "special tokens; pass exclude_special=False to perturb them too"
        )
    return kept


def _explicit_positions(spans: ChatSpans, positions: Sequence[int]) -> list[int]:
    pool = [int(pos) for pos in positions]
    if not pool:
        raise ValueError("positions is empty; pass at least one position, or positions=None")
    bad = [pos for pos in pool if not 0 <= pos < len(spans)]
    if bad:
        raise ValueError(f"positions {bad} are outside the prompt's {len(spans)} tokens")
    if len(set(pool)) != len(pool):
        raise ValueError("positions has duplicates; pass each position once")
    return sorted(pool)


def perturb_segment(
    model_or_tokenizer: Any,
    spans: ChatSpans,
    segment: str,
    *,
    n_tokens: int = 10,
    mode: PerturbMode | str = PerturbMode.NEAREST,
    top_k: int = 5,
    trials: int = 10,
    seed: int = 0,
    embedding: Float[Tensor, "vocab d_model"] | None = None,
    exclude_special: bool = True,
    positions: Sequence[int] | None = None,
) -> list[Perturbation]:
    """``trials`` perturbed copies of the prompt, each with ``n_tokens`` tokens of one segment replaced.

    Each trial draws ``n_tokens`` distinct positions uniformly from ``segment`` (all of
    them if it is shorter: ``Perturbation.n_tokens`` records the actual count) and
    replaces each token by

    * ``mode="nearest"``: one of its ``top_k`` nearest neighbours in the input
      embedding (cosine), chosen uniformly. The embedding is ``embedding=``, else the
      model's ``W_E`` (or ``original_model.get_input_embeddings().weight``); rows past
      ``len(tokenizer)`` (padding rows) are never candidates.
    * ``mode="random"``: a uniformly random vocabulary token (of ``len(tokenizer)``)
      other than the original one. A tokenizer is enough.

    Replacements are never special tokens. ``exclude_special=True`` also leaves the
    POSITIONS of special tokens (``<|im_start|>``, ``<|im_end|>``) unperturbed; the paper
    does not say whether it perturbs them, so this is a choice (``False`` allows it).
    ``positions=`` replaces the segment by an explicit pool of positions (e.g. random
    non-template positions as a control); ``segment`` is then only a label.

    Trial ``t`` uses ``random.Random(f"{seed}:{segment}:{t}")``: deterministic per seed,
    independent across trials and segments, and asking for more trials keeps the first
    ones. No global RNG is touched.

    Example:
        >>> from piggyback_interp.core.spans import chat_spans
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> spans = chat_spans(tok, "Tell me a joke.")
        >>> out = perturb_segment(tok, spans, "query", mode="random", n_tokens=2, trials=3)
        >>> [p.n_tokens for p in out], out[0].input_ids != spans.input_ids
        ([2, 2, 2], True)
    """
    require_positive(n_tokens=n_tokens, top_k=top_k, trials=trials)
    mode = PerturbMode.parse(mode, "mode")
    if not isinstance(segment, str) or not segment:
        raise ValueError(f"segment must be a non-empty string such as 'prefix', got {segment!r}")
    tokenizer = _tokenizer_of(model_or_tokenizer)
    pool = perturbable_positions(
        spans, segment, tokenizer, exclude_special=exclude_special, positions=positions
    )
    originals = sorted({spans.input_ids[pos] for pos in pool})
    if mode is PerturbMode.NEAREST:
        emb = embedding_of(model_or_tokenizer, embedding)
        candidates = neighbour_table(emb, originals, tokenizer, top_k)
    else:
        candidates = random_table(originals, tokenizer)
    count = min(n_tokens, len(pool))
    return [
        _one_trial(spans, pool, count, candidates, segment, trial, mode, seed)
        for trial in range(trials)
    ]


def _one_trial(
    spans: ChatSpans,
    pool: list[int],
    count: int,
    candidates: dict[int, Sequence[int]],
    segment: str,
    trial: int,
    mode: PerturbMode,
    seed: int,
) -> Perturbation:
    rng = random.Random(f"{seed}:{segment}:{trial}")
    chosen = sorted(rng.sample(pool, count))
    original = tuple(spans.input_ids[pos] for pos in chosen)
    replacement = tuple(_draw(rng, candidates[token], token) for token in original)
    ids = list(spans.input_ids)
    for pos, new in zip(chosen, replacement, strict=True):
        ids[pos] = new
    return Perturbation(
        input_ids=tuple(ids),
        positions=tuple(chosen),
        original=original,
        replacement=replacement,
        segment=segment,
        trial=trial,
        mode=mode.value,
    )


def _draw(rng: random.Random, candidates: Sequence[int], original: int) -> int:
    """A uniform draw from ``candidates`` other than ``original`` (by rejection)."""
    while True:
        token = candidates[rng.randrange(len(candidates))]
        if token != original:
            return token


def _tokenizer_of(model_or_tokenizer: Any) -> PreTrainedTokenizerBase:
    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    if getattr(model_or_tokenizer, "tokenizer", None) is None:
        raise ValueError(
            f"expected a TransformerBridge (with a tokenizer) or a tokenizer, got "
            f"{type(model_or_tokenizer).__name__}"
        )
    from piggyback_interp.core.models import (
        chat_tokenizer,  # loads TransformerLens: only for models
    )

    return chat_tokenizer(model_or_tokenizer)


def perturb_segments(
    model_or_tokenizer: Any,
    spans: ChatSpans,
    segments: Sequence[str] = PERTURB_SEGMENTS,
    *,
    n_tokens: int | None = None,
    **kwargs: Any,
) -> dict[str, list[Perturbation]]:
    """:func:`perturb_segment` for several segments side by side, with matched counts.

    ``n_tokens=None`` perturbs the same number of tokens in every segment: the smallest
    number of perturbable positions among ``segments`` (the paper's control: as many
    tokens in the query or postfix as in the prefix). A given ``n_tokens`` is used as is,
    so a segment shorter than it uses all its positions and counts may then differ
    (``Perturbation.n_tokens`` says). Other keywords go to :func:`perturb_segment`
    (``positions=`` is not allowed here).

    Example:
        >>> from piggyback_interp.core.spans import chat_spans
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> spans = chat_spans(tok, "What is the capital of France?")
        >>> out = perturb_segments(tok, spans, mode="random", trials=2)
        >>> {name: trials[0].n_tokens for name, trials in out.items()}
        {'prefix': 6, 'query': 6, 'postfix': 6}
    """
    if "positions" in kwargs:
        raise ValueError("perturb_segments takes no positions=; call perturb_segment for those")
    if isinstance(segments, str) or not segments:
        raise ValueError(f"segments must be a non-empty tuple of names, got {segments!r}")
    if len(set(segments)) != len(segments):
        raise ValueError(f"segments has duplicates: {tuple(segments)}; name each segment once")
    if n_tokens is None:
        tokenizer = _tokenizer_of(model_or_tokenizer)
        exclude_special = kwargs.get("exclude_special", True)
        n_tokens = min(
            len(perturbable_positions(spans, name, tokenizer, exclude_special=exclude_special))
            for name in segments
        )
    return {
        name: perturb_segment(model_or_tokenizer, spans, name, n_tokens=n_tokens, **kwargs)
        for name in segments
    }


# --- aggregation -----------------------------------------------------------------------


def aggregate_trials(
    scores: Float[Tensor, "prompts trials"], *, higher_is_better: bool = True
) -> dict[str, float | int]:
    """The paper's Best and Avg of a ``prompts x trials`` score matrix, with standard errors.

    ``best``: the best trial of each prompt (max, or min when ``higher_is_better=False``),
    averaged over prompts. ``avg``: the mean over all trials and prompts. ``best_se`` and
    ``avg_se``: the standard error over prompts (sample std / sqrt(prompts)) of the
    per-prompt best and the per-prompt mean; NaN for a single prompt.

    Example:
        >>> out = aggregate_trials(torch.tensor([[0.0, 1.0], [2.0, 4.0]]))
        >>> out["best"], out["avg"], out["n_prompts"], out["n_trials"]
        (2.5, 1.75, 2, 2)
    """
    if scores.numel() == 0:
        raise ValueError(f"scores is empty (shape {tuple(scores.shape)}); pass prompts x trials")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; score every trial (or drop the prompt) first")
    values = scores.detach().double().cpu()
    best = values.max(dim=1).values if higher_is_better else values.min(dim=1).values
    n_prompts, n_trials = values.shape
    return {
        "best": float(best.mean()),
        "avg": float(values.mean()),
        "best_se": _standard_error(best),
        "avg_se": _standard_error(values.mean(dim=1)),
        "n_prompts": n_prompts,
        "n_trials": n_trials,
    }


def _standard_error(per_prompt: Tensor) -> float:
    if len(per_prompt) < 2:
        return math.nan
    return float(per_prompt.std(correction=1) / math.sqrt(len(per_prompt)))


def trials_frame(
    perturbations_per_prompt: Sequence[Sequence[Perturbation]],
    scores: Float[Tensor, "prompts trials"],
) -> pd.DataFrame:
    """A tidy frame, one row per perturbed prompt, with its score.

    ``scores[i, j]`` is the score of ``perturbations_per_prompt[i][j]``. Each prompt's
    list may hold several segments (e.g. the lists of :func:`perturb_segments`
    concatenated); every row records its own segment and trial. Columns: ``prompt``,
    ``segment``, ``trial``, ``mode``, ``n_tokens``, ``positions`` (e.g. ``"3,7,9"``),
    ``score``.

    Example:
        >>> p = Perturbation((1, 5), (1,), (7,), (5,), "prefix", 0, "random")
        >>> trials_frame([[p]], torch.tensor([[0.5]])).to_dict("records")
        [{'prompt': 0, 'segment': 'prefix', 'trial': 0, 'mode': 'random', 'n_tokens': 1, 'positions': '1', 'score': 0.5}]
    """
    shape = (len(perturbations_per_prompt), *{len(row) for row in perturbations_per_prompt})
    if len(shape) != 2 or tuple(scores.shape) != shape:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)} but the perturbations are "
            f"{len(perturbations_per_prompt)} prompts with "
            f"{sorted({len(row) for row in perturbations_per_prompt})} trials each; "
            "pass one score per perturbation, the same number for every prompt"
        )
    values = scores.detach().double().cpu().tolist()
    rows = [
        {
            "prompt": i,
            "segment": p.segment,
            "trial": p.trial,
            "mode": p.mode,
            "n_tokens": p.n_tokens,
            "positions": ",".join(str(pos) for pos in p.positions),
            "score": values[i][j],
        }
        for i, row in enumerate(perturbations_per_prompt)
        for j, p in enumerate(row)
    ]
    return pd.DataFrame(rows, columns=list(_FRAME_COLUMNS))


_FRAME_COLUMNS = ("prompt", "segment", "trial", "mode", "n_tokens", "positions", "score")
