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

The prefix groups and their caches are in :mod:`.prefix_cache`; token-by-token
decoding (greedy, sampling) is in :mod:`.decoding`.

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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from piggyback_interp.core.errors import InputTooLongError, UserError
from piggyback_interp.core.hf import eos_token_ids
from piggyback_interp.core.models import chat_tokenizer, context_length, model_info
from piggyback_interp.core.spans import (
    ChatBatch,
    ChatSpans,
    batch_spans,
    render_prompts,
)
from piggyback_interp.interventions.decoding import Decoder, Sampler, greedy, pad_id
from piggyback_interp.interventions.prefix_cache import PrefixGroup, prefix_groups
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
    decoder = Decoder(
        model,
        max_new_tokens=max_new_tokens,
        pick=greedy if temperature == 0 else Sampler(temperature, top_p, seed),
        eos_ids=eos_token_ids(model, tokenizer) if stop_at_eos else (),
        pad_id=pad_id(tokenizer),
    )
    new_ids, finished = _decode_all(model, rows, specs, decoder, batch_size, on_batch)
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


def _decode_all(
    model: Any,
    rows: list[ChatSpans],
    specs: list[PatchSpec],
    decoder: Decoder,
    batch_size: int,
    on_batch: Callable[[int], Any] | None,
) -> tuple[list[list[int]], list[bool]]:
    """The new token ids of every prompt, and whether each ended at an EOS: prompts are
    grouped by prefix (one patched prefix cache each) and run batch by batch."""
    tokenizer = chat_tokenizer(model)
    new_ids: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    with torch.no_grad():
        for members in prefix_groups(rows):
            group = PrefixGroup(model, rows, members, specs)
            for chunk in group.batches(batch_size):
                batch = batch_spans(tokenizer, [rows[i] for i in chunk], align="prefix")
                logits, cache = group.prompt_forward(batch, chunk)
                for i, (ids, done) in zip(chunk, decoder(logits, cache, batch, chunk), strict=True):
                    new_ids[i], finished[i] = ids, done
                if on_batch is not None:
                    on_batch(len(chunk))
    return new_ids, finished
