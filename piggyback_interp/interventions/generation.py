"""Batched chat generation with a KV cache, optionally under activation patches.

Every prompt of a chat template starts with the same prefix, so its KV cache is
computed once (per prefix and patch) and shared by every batch: rows are padded
BETWEEN prefix and query (``batch_spans(..., align="prefix")``), the shared cache is
repeated to the batch size, and only the rest of each prompt runs per batch.

A patch on the prefix is baked into that cache: the prefix runs once under the patch
and later positions read the prefix only through the cache, so the patch costs
nothing afterwards (for ``site="kv"`` this is the paper's Eq. 1 cache swap). A patch
at later positions (query, postfix, explicit positions) applies to the prompt's
forward only; decoding then runs without hooks, reading the patched prompt cache.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.interventions.generation import PatchSpec, generate
    >>> base, finetuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> gens = generate(finetuned, ["Hi", "Tell me a joke."], max_new_tokens=4,
    ...                 patch=PatchSpec(base, site="kv", segment="prefix"))
    >>> len(gens.texts), all(len(ids) <= 4 for ids in gens.token_ids)
    (2, True)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from piggyback_interp.core.errors import InputTooLongError, UserError
from piggyback_interp.core.hf import eos_token_ids, forward_with_cache, repeat_cache
from piggyback_interp.core.hooks import KV_SITES
from piggyback_interp.core.models import chat_tokenizer, context_length, model_info
from piggyback_interp.core.spans import (
    ChatBatch,
    ChatSpans,
    batch_spans,
    prefix_only,
    render_prompts,
    require_segment,
)
from piggyback_interp.interventions.activations import (
    Activations,
    Positions,
    keep_hooks,
    segment_positions,
    site_layers,
)
from piggyback_interp.interventions.patch import (
    check_tokens,
    isolated,
    patch_activations,
    patch_prefix,
)
from piggyback_interp.interventions.sources import as_source

PATCH_SEGMENTS = ("prefix", "query", "postfix")

# ---------------------------------------------------------------- public types


@dataclass
class PatchSpec:
    """One patch for :func:`generate`: the arguments of :func:`~piggyback_interp.patch_prefix`.

    ``source`` is a model (run on the same prompts; on the empty-query prompt for the
    postfix) or :class:`~piggyback_interp.interventions.Activations` (with one row shared by
    every prompt, or one row per prompt in the order given to :func:`generate`; its own
    sites and layers are used). ``segment`` is ``"prefix"``, ``"query"``, ``"postfix"``
    or explicit positions of the unpadded prompt (all in the prefix, or all after it).

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> spec = PatchSpec(tiny_model("llama"), site="kv", layers=[0], segment="postfix")
        >>> spec.describe()["layers"], spec.describe()["segment"]
        ([0], 'postfix')
    """

    source: Any
    site: str | Sequence[str] = "kv"
    layers: int | Iterable[int] | None = None
    segment: str | Sequence[int] = "prefix"
    heads: Sequence[int] | None = None
    isolate: bool = True

    def __post_init__(self) -> None:
        try:
            as_source(self.source)
        except TypeError as err:
            raise TypeError(f"PatchSpec.source: {err}") from None
        if isinstance(self.segment, str):
            if self.segment not in PATCH_SEGMENTS:
                raise ValueError(
                    f"cannot patch segment {self.segment!r} during generation; choose one of "
                    f"{PATCH_SEGMENTS} or explicit positions (prompts have no response)"
                )
        elif not self.segment or not all(isinstance(p, int) for p in self.segment):
            raise ValueError("explicit segment positions must be a non-empty list of ints")
        if not isinstance(self.layers, int | None):
            self.layers = list(self.layers)  # a generator would be used up

    def describe(self) -> dict[str, Any]:
        """The patch as plain data (for ``Generations.config`` and result tables)."""
        source = as_source(self.source)
        if source.model is None:  # fixed Activations: their own sites and layers
            label = f"Activations({self.source.source})"
            site: Any = list(self.source.sites)
            layers: Any = list(self.source.layers)
        else:
            label = source.label
            site = self.site if isinstance(self.site, str) else list(self.site)
            layers = self.layers if isinstance(self.layers, int | None) else list(self.layers)
        return {
            "source": label,
            "site": site,
            "layers": [layers] if isinstance(layers, int) else layers,
            "segment": self.segment if isinstance(self.segment, str) else list(self.segment),
            "heads": None if self.heads is None else list(self.heads),
            "isolate": self.isolate,
        }


@dataclass
class Generations:
    """Generated continuations, one per prompt, in the order of the prompts.

    ``token_ids`` holds the new tokens only, cut before the first EOS (when
    ``stop_at_eos``); ``texts`` is their decoding (special tokens kept);
    ``finished[i]`` says whether prompt ``i`` ended at an EOS; ``prompts`` are the
    rendered, unpadded prompts; ``config`` records the settings as plain data.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> gens = generate(tiny_model("llama"), ["Hi"], max_new_tokens=3)
        >>> list(gens.to_frame().columns)
        ['prompt', 'query', 'text', 'n_tokens', 'finished']
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompts: list[ChatSpans]
    config: dict[str, Any]
    finished: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def to_frame(self) -> Any:
        """One row per prompt: ``prompt`` (index), ``query``, ``text``, ``n_tokens``, ``finished``.

        ``frame.attrs["config"]`` holds :attr:`config`.
        """
        import pandas as pd

        frame = pd.DataFrame(
            {
                "prompt": list(range(len(self.texts))),
                "query": [s.text[slice(*s.query_chars)] for s in self.prompts],
                "text": self.texts,
                "n_tokens": [len(ids) for ids in self.token_ids],
                "finished": self.finished or [False] * len(self.texts),
            }
        )
        frame.attrs["config"] = self.config
        return frame


Prompt = str | Sequence[Mapping[str, Any]] | ChatSpans
PatchArg = PatchSpec | Sequence[PatchSpec] | None


# ---------------------------------------------------------------- generate


def generate(
    model: Any,
    prompts: Sequence[Prompt] | ChatBatch,
    *,
    patch: PatchArg = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    system_prompt: str | None = "default",
    stop_at_eos: bool = True,
    on_batch: Callable[[int], Any] | None = None,
) -> Generations:
    """Generate a reply to every chat prompt, batched, with a KV cache, optionally patched.

    Args:
        model: a :class:`~transformer_lens.model_bridge.TransformerBridge`.
        prompts: user messages (``str``), message lists, :class:`ChatSpans`, or a
            :class:`ChatBatch` (its rows are un-padded and re-batched).
        patch: ``None``, a :class:`PatchSpec` or a list of them (applied together:
            prefix patches first, then the others, each in the given order, as nested
            ``patch_prefix`` blocks whose model sources run unpatched).
        max_new_tokens: at most this many new tokens per prompt.
        temperature: 0 is greedy (argmax); otherwise sample from ``softmax(logits / T)``.
        top_p: nucleus sampling: keep the most likely tokens up to this mass.
        seed: sampling seed. Prompt ``i`` draws from its own ``torch.Generator`` seeded
            by ``(seed, i)``, so samples do not depend on ``batch_size``; the global RNG
            is untouched.
        batch_size: prompts per forward. Prompts are grouped by prefix (one cache each)
            and sorted by length within a group to reduce padding.
        system_prompt: as in :func:`~piggyback_interp.core.spans.chat_spans`, for ``str`` and
            message-list prompts.
        stop_at_eos: stop a row at the tokenizer's / generation config's EOS token(s).
        on_batch: called after each batch with its number of prompts (e.g. a
            progress bar's ``update``).

    Prompts with different prefixes (e.g. different system prompts) are allowed: each
    distinct prefix gets its own (patched) prefix cache, computed once.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("qwen3")
        >>> gens = generate(model, ["Hi", "What is the capital of France?"], max_new_tokens=5)
        >>> [len(ids) <= 5 for ids in gens.token_ids]
        [True, True]
    """
    _check_settings(max_new_tokens, temperature, top_p, batch_size)
    specs = _as_specs(patch)
    tokenizer = chat_tokenizer(model)
    rows = _as_spans(tokenizer, prompts, system_prompt)
    _check_context(model, rows, max_new_tokens)
    decoder = _Decoder(
        model,
        max_new_tokens=max_new_tokens,
        pick=_greedy if temperature == 0 else _Sampler(temperature, top_p, seed),
        eos_ids=eos_token_ids(model, tokenizer) if stop_at_eos else (),
        pad_id=_pad_id(tokenizer),
    )
    new_ids: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    with torch.no_grad():
        for members in _prefix_groups(rows):
            group = _PrefixGroup(model, rows, members, specs)
            for chunk in group.batches(batch_size):
                batch = batch_spans(tokenizer, [rows[i] for i in chunk], align="prefix")
                logits, cache = group.prompt_forward(batch, chunk)
                for i, (ids, done) in zip(chunk, decoder(logits, cache, batch, chunk), strict=True):
                    new_ids[i], finished[i] = ids, done
                if on_batch is not None:
                    on_batch(len(chunk))
    config = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "batch_size": batch_size,
        "stop_at_eos": stop_at_eos,
        "system_prompt": system_prompt,
        "model": model_info(model).name,
        "patch": [spec.describe() for spec in specs] or None,
    }
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in new_ids]
    return Generations(texts, new_ids, rows, config, finished)


# ---------------------------------------------------------------- inputs


def _check_settings(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")


def _as_specs(patch: PatchArg) -> list[PatchSpec]:
    if patch is None:
        return []
    specs = [patch] if isinstance(patch, PatchSpec) else list(patch)
    bad = [type(s).__name__ for s in specs if not isinstance(s, PatchSpec)]
    if bad:
        raise TypeError(f"patch must be a PatchSpec or a list of them, got {bad[0]}")
    return specs


def _as_spans(
    tokenizer: Any, prompts: Sequence[Prompt] | ChatBatch, system_prompt: str | None
) -> list[ChatSpans]:
    if isinstance(prompts, str | ChatSpans):
        raise ValueError("prompts must be a list; wrap a single prompt in a list")
    items = prompts.spans if isinstance(prompts, ChatBatch) else prompts
    if len(items) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    rows = [
        p.without_padding() for p in render_prompts(tokenizer, items, system_prompt=system_prompt)
    ]
    for i, spans in enumerate(rows):
        if spans.response is not None:
            raise ValueError(
                f"prompt {i} ends with an assistant message (a response); generation needs "
                "prompts that end with the user's message"
            )
    return rows


def _check_context(model: Any, rows: list[ChatSpans], max_new_tokens: int) -> None:
    """Every prompt and its ``max_new_tokens`` must fit the model's context."""
    limit = context_length(model)
    if limit is None:
        return
    for i, spans in enumerate(rows):
        if len(spans) + max_new_tokens > limit:
            raise InputTooLongError(
                f"prompt {i} has {len(spans)} tokens; with max_new_tokens={max_new_tokens} "
                f"that is {len(spans) + max_new_tokens}, more than the model's context of "
                f"{limit} tokens (max_position_embeddings); lower max_new_tokens to at most "
                f"{max(limit - len(spans), 0)} or shorten the prompt"
            )


def _prefix_groups(rows: list[ChatSpans]) -> list[list[int]]:
    """Prompt indices grouped by identical prefix token ids (first appearance order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, spans in enumerate(rows):
        groups.setdefault(spans.input_ids[: spans.prefix.stop], []).append(i)
    return list(groups.values())


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def _select_rows(acts: Activations, rows: Sequence[int], n_prompts: int) -> Activations:
    """Activations with one row per prompt (``n_prompts`` rows) cut to ``rows``; shared ones as is."""
    n = acts.token_ids.shape[0]
    if n == 1:
        return acts
    if n != n_prompts:
        raise ValueError(
            f"the source Activations have {n} rows; generate needs 1 (shared by every prompt) "
            f"or one per prompt ({n_prompts}), in the order of the prompts"
        )
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    values = {name: v[idx.to(v.device)] for name, v in acts.values.items()}
    return Activations(values, acts.token_ids[idx], acts.sites, acts.layers, acts.source, acts.meta)


def _check_width(acts: Activations, positions: Positions, segment: str | Sequence[int]) -> None:
    if acts.n_positions != positions.shape[-1]:
        what = segment if isinstance(segment, str) else "explicit positions"
        raise ValueError(
            f"the source Activations hold {acts.n_positions} positions but the prompts' "
            f"{what} has {positions.shape[-1]}; take them from prompts with the same template "
            "tokens there (e.g. the same system prompt)"
        )


def _in_prefix(spec: PatchSpec, n_prefix: int) -> bool:
    """Whether ``spec`` patches only prefix positions (True) or only later ones (False)."""
    if isinstance(spec.segment, str):
        return spec.segment == "prefix"
    inside = [p < n_prefix for p in spec.segment]
    if all(inside) or not any(inside):
        return all(inside)
    raise ValueError(
        f"explicit positions {list(spec.segment)} lie both in the prefix (positions "
        f"0..{n_prefix - 1}) and after it; split them into two PatchSpecs"
    )


@dataclass
class _Prepared:
    """A later-position patch ready for one batch: values and suffix-relative positions."""

    acts: Activations
    positions: Int[Tensor, "rows n"]
    heads: Sequence[int] | None


class _PrefixGroup:
    """Prompts sharing one prefix: the (patched) prefix cache, built once, and their batches."""

    def __init__(
        self, model: Any, rows: list[ChatSpans], members: list[int], specs: list[PatchSpec]
    ) -> None:
        self.model, self.rows, self.members = model, rows, members
        self.n_prefix = len(rows[members[0]].prefix)
        self.n_prompts = len(rows)
        in_prefix = [_in_prefix(s, self.n_prefix) for s in specs]
        self.prefix_specs = [s for s, inside in zip(specs, in_prefix, strict=True) if inside]
        self.later_specs = [s for s, inside in zip(specs, in_prefix, strict=True) if not inside]
        if self.prefix_specs and self.n_prefix == 0:
            require_segment(rows[members[0]], "prefix")  # raises: this template has no prefix
        self._postfix_memo: dict[tuple[int, tuple[int, ...]], Activations] = {}
        self.cache = self._prefix_cache()

    # ---- the prefix, once

    def _prefix_cache(self) -> Any:
        """The prefix's KV cache (one row), computed once, under the prefix patches."""
        if self.n_prefix == 0:
            return None
        spans = prefix_only(self.rows[self.members[0]])
        batch = batch_spans(chat_tokenizer(self.model), [spans])
        # every model source runs unpatched, before any patch is installed
        sources = [self._prefix_source(spec, batch) for spec in self.prefix_specs]
        with contextlib.ExitStack() as stack:
            for spec, acts in zip(self.prefix_specs, sources, strict=True):
                stack.enter_context(
                    patch_prefix(
                        self.model,
                        acts,
                        batch,
                        segment=spec.segment,
                        heads=spec.heads,
                        isolate=spec.isolate,
                    )
                )
            _, cache = forward_with_cache(
                self.model, batch.input_ids, batch.attention_mask, batch.position_ids, None
            )
        return cache

    def _prefix_source(self, spec: PatchSpec, batch: ChatBatch) -> Activations:
        source = as_source(spec)
        if source.model is None:  # fixed values: their own sites and layers, row by row
            acts = source.activations(self.model, batch, spec.segment)
            _check_width(acts, segment_positions(batch, spec.segment), spec.segment)
            return _select_rows(acts, self.members[:1], self.n_prompts)
        return _model_values(self.model, spec, batch)

    # ---- batches

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Chunks of at most ``batch_size`` prompts, longest first; rows of a chunk have
        equally many positions under every later-position patch."""
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i in self.members:
            key = tuple(self._n_positions(spec, self.rows[i]) for spec in self.later_specs)
            shapes.setdefault(key, []).append(i)
        for members in shapes.values():
            ordered = sorted(members, key=lambda i: -len(self.rows[i]))
            for start in range(0, len(ordered), batch_size):
                yield ordered[start : start + batch_size]

    @staticmethod
    def _n_positions(spec: PatchSpec, spans: ChatSpans) -> int:
        if isinstance(spec.segment, str):
            return len(require_segment(spans, spec.segment))
        return len(spec.segment)

    # ---- the rest of the prompt, per batch

    def prompt_forward(
        self, batch: ChatBatch, rows: list[int]
    ) -> tuple[Float[Tensor, "batch vocab"], Any]:
        """Last-position logits and the full prompt cache, later-position patches applied."""
        prepared: list[_Prepared] = []
        for spec in self.later_specs:
            prepared.append(self._prepare(spec, batch, rows, prepared))
        with _patched(self.model, prepared):
            return self._suffix_forward(batch)

    def _suffix_forward(self, batch: ChatBatch) -> tuple[Float[Tensor, "batch vocab"], Any]:
        p = self.n_prefix
        return forward_with_cache(
            self.model,
            batch.input_ids[:, p:],
            batch.attention_mask,
            batch.position_ids[:, p:],
            repeat_cache(self.cache, len(batch)),
        )

    def _prepare(
        self, spec: PatchSpec, batch: ChatBatch, rows: list[int], earlier: list[_Prepared]
    ) -> _Prepared:
        positions = segment_positions(batch, spec.segment)
        acts = self._later_source(spec, batch, rows)
        _check_width(acts, positions, spec.segment)
        check_tokens(acts, batch, positions)
        heads = spec.heads
        if spec.isolate and any(s in KV_SITES for s in acts.sites):
            # the target's own keys/values there, under the earlier patches, read
            # over the prefix cache (as nested patch_prefix blocks would take them)
            def clean() -> Activations:
                with _patched(self.model, earlier):
                    return self._capture_suffix(batch, positions)

            acts = isolated(self.model, acts, batch, spec.segment, heads=heads, clean=clean)
            heads = None
        return _Prepared(acts, positions - self.n_prefix, heads)

    def _later_source(self, spec: PatchSpec, batch: ChatBatch, rows: list[int]) -> Activations:
        source = as_source(spec)
        if source.model is None:  # fixed values, row by row
            acts = source.activations(self.model, batch, spec.segment)
            return _select_rows(acts, rows, self.n_prompts)
        take = functools.partial(_model_values, self.model, spec, batch)
        if spec.segment != "postfix":
            return take()
        # the postfix reference (empty-query prompt) is the same for every batch
        reference = batch.input_ids[0, list(batch.spans[0].postfix)].tolist()
        key = (id(spec), tuple(reference))
        if key not in self._postfix_memo:
            self._postfix_memo[key] = take()
        return self._postfix_memo[key]

    def _capture_suffix(self, batch: ChatBatch, positions: Tensor) -> Activations:
        """The model's own keys and values at ``positions`` (after the prefix) in every
        layer, read over the prefix cache."""
        values: dict[str, Tensor] = {}
        pairs = site_layers(self.model, KV_SITES, None)
        with self.model.hooks(fwd_hooks=keep_hooks(pairs, positions - self.n_prefix, values)):
            self._suffix_forward(batch)
        rows = torch.arange(len(batch))[:, None]
        layers = tuple(range(self.model.cfg.n_layers))
        return Activations(values, batch.input_ids[rows, positions], KV_SITES, layers)


def _model_values(model: Any, spec: PatchSpec, batch: ChatBatch) -> Activations:
    """A model source's values for ``spec`` on ``batch`` (the postfix: the reference)."""
    return as_source(spec).activations(
        model, batch, spec.segment, site=spec.site, layers=spec.layers, postfix_reference=True
    )


@contextlib.contextmanager
def _patched(model: Any, prepared: list[_Prepared]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for p in prepared:
            stack.enter_context(patch_activations(model, p.acts, p.positions, heads=p.heads))
        yield


# ---------------------------------------------------------------- decoding


def _greedy(logits: Float[Tensor, "batch vocab"], rows: list[int]) -> Int[Tensor, " batch"]:
    return logits.argmax(-1)


class _Sampler:
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


class _Decoder:
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
