"""Load a chat model as a TransformerLens 4 ``TransformerBridge`` (pairs: :mod:`.pairs`).

A bridge wraps the Hugging Face model itself: its parameters ARE the HF parameters
(peft and ``save_pretrained`` work on them) and its logits equal HF's. Every model
loaded here carries a :class:`ModelInfo` (``model_info(model)``) saying exactly what
it is, for the provenance of results.

Example:
    >>> from piggyback_interp import load_model, chat_spans
    >>> model = load_model("smollm2-135m-instruct")          # the embedded default
    >>> spans = chat_spans(model.tokenizer, "What is the capital of France?")
    >>> out = model.generate(spans.ids[None], max_new_tokens=8, do_sample=False, verbose=False)
    >>> "Paris" in model.tokenizer.decode(out[0, len(spans):])
    True
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

from piggyback_interp.core.embedded import (
    EMBEDDED_DISPLAY_NAME,
    EMBEDDED_NAME,
    cache_root,
    embedded_model_dir,
    read_manifest,
    sha256_file,
)
from piggyback_interp.core.errors import ModelError
from piggyback_interp.core.hf import hf_config
from piggyback_interp.core.placement import (
    Placement,
    execution_device,
    load_adapter,
    unknown_modules,
)

SourceKind = Literal["embedded", "local", "hub", "adapter"]
ADAPTER_CONFIG = "adapter_config.json"


class ModelLoadError(ModelError, OSError):
    """A model could not be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved before any weights are read."""

    name: str
    kind: SourceKind
    path: str  # local directory, or the hub repo id
    adapter_path: str | None = None
    base: ModelSource | None = None  # the base a LoRA adapter applies to


@dataclass
class ModelInfo:
    """Provenance of a loaded model: name, kind, path, weights hash, dtype, merge state."""

    name: str
    display_name: str
    kind: SourceKind
    path: str
    dtype: str
    adapter_path: str | None = None
    adapter_merged: bool | None = None
    base_name: str | None = None
    _sha256: str | None = field(default=None, repr=False)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 over the weight files (safetensors, then adapter), hashed lazily."""
        if self._sha256 is not None:
            return self._sha256
        files = _weight_files(Path(self.path)) if self.kind != "hub" else []
        if self.adapter_path:
            files += _weight_files(Path(self.adapter_path))
        if not files:
            return "unknown"
        if len(files) == 1:
            return sha256_file(files[0])

        return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()

    @property
    def known_sha256(self) -> str | None:
        """The weights hash if known already (from the manifest, or hashed before); never hashes."""
        return self._sha256 or self.__dict__.get("sha256")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (computes the hash)."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "kind": self.kind,
            "path": self.path,
            "dtype": self.dtype,
            "adapter_path": self.adapter_path,
            "adapter_merged": self.adapter_merged,
            "base_name": self.base_name,
            "sha256": self.sha256,
        }


def _weight_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))


def resolve_source(name_or_path: str | os.PathLike[str], *, base: str | None = None) -> ModelSource:
    """Resolve a model name to a :class:`ModelSource` without loading weights.

    ``"smollm2-135m-instruct"`` is the embedded model (built into the cache on first
    use); a directory with ``config.json`` is a local HF model; a directory with
    ``adapter_config.json`` is a peft adapter on its base (``base`` overrides the
    base named in the adapter); ``"org/name"`` is a Hugging Face Hub repo id.
    """
    name = os.fspath(name_or_path)
    if name == EMBEDDED_NAME:
        return ModelSource(name, "embedded", str(embedded_model_dir()))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            adapter_cfg = json.loads((path / ADAPTER_CONFIG).read_text())
            base_name = base or adapter_cfg.get("base_model_name_or_path")
            if not base_name:
                raise ModelLoadError(
                    f"{path / ADAPTER_CONFIG} names no base model "
                    "(base_model_name_or_path); pass base=... to load_model"
                )
            if Path(base_name).expanduser().resolve() == (cache_root() / EMBEDDED_NAME).resolve():
                base_name = EMBEDDED_NAME  # an adapter trained on the embedded model
            base_source = resolve_source(base_name)
            return ModelSource(name, "adapter", base_source.path, str(path), base_source)
        if (path / "config.json").is_file():
            return ModelSource(name, "local", str(path.resolve()))
        raise ModelLoadError(
            f"{path} is a directory but holds neither config.json (an HF model) nor "
            f"{ADAPTER_CONFIG} (a peft adapter); point at the folder that save_pretrained wrote"
        )
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"no model directory at {name!r} and it is not a hub id of the form 'org/name'; "
            f"give a local HF directory, a hub id, or {EMBEDDED_NAME!r} (the embedded model)"
        )
    return ModelSource(name, "hub", name)


def _hub_error(source: ModelSource, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {source.path!r} from the Hugging Face Hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). If this machine is offline, "
        f"download it elsewhere (`hf download {source.path} --local-dir DIR`) and pass DIR, "
        f"or use {EMBEDDED_NAME!r}, the embedded model, which needs no network"
    )


def load_tokenizer(source: ModelSource | str) -> Any:
    """The tokenizer of a model (adapter folders may carry their own), its
    ``model_max_length`` set to the model's :func:`context_length` (no weights are read)."""
    from transformers import AutoTokenizer

    if isinstance(source, str):
        source = resolve_source(source)
    where = source.path
    if source.adapter_path and (Path(source.adapter_path) / "tokenizer_config.json").is_file():
        where = source.adapter_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as err:
        if source.kind == "hub" or (source.base and source.base.kind == "hub"):
            raise _hub_error(source, err) from err
        raise
    limit = context_length(load_config(source))
    if limit is not None:
        tokenizer.model_max_length = limit
    return tokenizer


def load_config(source: ModelSource | str) -> Any:
    """The HF config of a model (its base's for an adapter), without loading weights."""
    from transformers import AutoConfig

    if isinstance(source, str):
        source = resolve_source(source)
    try:
        return AutoConfig.from_pretrained(source.path)
    except OSError as err:
        if source.kind == "hub" or (source.base and source.base.kind == "hub"):
            raise _hub_error(source, err) from err
        raise


def load_hf(
    source: ModelSource,
    *,
    device: str,
    dtype: torch.dtype,
    merge_adapter: bool,
    placement: Placement | None = None,
) -> Any:
    from transformers import AutoModelForCausalLM

    has_safetensors = bool(list(Path(source.path).glob("*.safetensors")))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=dtype,
            attn_implementation="eager",  # the bridge hooks attention patterns
            # safetensors where present; transformers reads .bin with weights_only=True
            use_safetensors=True if has_safetensors else None,
            **(placement.kwargs(source.name) if placement else {}),
        )
    except OSError as err:
        if source.kind == "hub" or (source.base and source.base.kind == "hub"):
            raise _hub_error(source, err) from err
        raise ModelLoadError(f"could not load the model at {source.path}: {err}") from err
    except ValueError as err:
        if placement is None:
            raise
        raise ModelLoadError(f"could not place {source.name} with {placement}: {err}") from err
    problem = None if placement is None else unknown_modules(model, placement)
    if problem:
        raise ModelLoadError(f"could not place {source.name}: {problem}")
    if source.adapter_path:
        peft_model = load_adapter(model, source.adapter_path, placement, source.name)
        model = peft_model.merge_and_unload() if merge_adapter else peft_model.base_model.model
    return (model if placement else model.to(device)).eval()


def _display_name(source: ModelSource) -> str:
    if source.kind == "embedded":
        return EMBEDDED_DISPLAY_NAME
    if source.kind == "adapter" and source.base is not None:
        return f"{_display_name(source.base)} + LoRA adapter {source.name}"
    return source.name


def source_info(source: ModelSource, dtype: torch.dtype, merge_adapter: bool) -> ModelInfo:
    known_hash = None
    if source.kind == "embedded":
        known_hash = (read_manifest(Path(source.path)) or {}).get("weights_sha256")
    return ModelInfo(
        name=source.name,
        display_name=_display_name(source),
        kind=source.kind,
        path=source.path,
        dtype=str(dtype).removeprefix("torch."),
        adapter_path=source.adapter_path,
        adapter_merged=merge_adapter if source.adapter_path else None,
        base_name=source.base.name if source.base else None,
        _sha256=known_hash,
    )


def bridge_from_hf(
    hf_model: Any, tokenizer: Any, *, name: str | None = None, info: ModelInfo | None = None
) -> TransformerBridge:
    """Wrap an already-loaded HF causal LM (or peft's ``base_model.model``) in a bridge.

    The bridge is set up for chat-templated input: ``to_tokens`` does not prepend a
    second BOS to text that the chat template already starts with. Its tokenizers'
    ``model_max_length`` is set to the model's :func:`context_length`, so rendering a
    chat longer than the model takes raises
    :class:`~piggyback_interp.core.errors.InputTooLongError`.
    """
    name = name or getattr(hf_model.config, "_name_or_path", "") or "model"
    placed = bool(getattr(hf_model, "hf_device_map", None))
    bridge = TransformerBridge.boot_transformers(
        name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        device=None if placed else str(hf_model.device),
    )
    if placed:  # TransformerLens names the embedding's device: "meta" when offloaded
        bridge.cfg.device = execution_device(hf_model)
    if getattr(tokenizer, "chat_template", None):
        bridge.cfg.default_prepend_bos = False
    limit = context_length(hf_model)
    if limit is not None:  # chat_spans refuses longer inputs (it sees only the tokenizer)
        tokenizer.model_max_length = bridge.tokenizer.model_max_length = limit
    bridge.chat_tokenizer = tokenizer  # the original tokenizer (the bridge's adds BOS)
    if info is not None:
        bridge.piggyback_info = info
    return bridge.eval()


def load_model(
    name_or_path: str | os.PathLike[str] = EMBEDDED_NAME,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    merge_adapter: bool = True,
    base: str | None = None,
    placement: Placement | None = None,
) -> TransformerBridge:
    """Load a chat model as a :class:`TransformerBridge` (eval mode).

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (embedded, offline), a local HF
            directory, a peft LoRA adapter directory, or a hub repo id (network).
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: parameter dtype; fp32 on CPU (bf16 backward is ~30x slower there).
        merge_adapter: for an adapter, merge it into the base weights (default) or
            keep the LoRA modules (for training on, or to compare unmerged).
        base: for an adapter, the base model to use instead of the one it names.
        placement: spread a model too big for one device over several GPUs, or over
            CPU and disk (a :class:`Placement`; ``device`` is then ignored). Patching,
            sweeps and generation run on it unchanged; train on one device per process.

    Example:
        >>> model = load_model("smollm2-135m-instruct")
        >>> model.cfg.n_layers, model_info(model).display_name
        (30, 'SmolLM2-135M-Instruct (Q4_1, dequantized)')
    """
    source = resolve_source(name_or_path, base=base)
    tokenizer = load_tokenizer(source)
    hf_model = load_hf(
        source, device=device, dtype=dtype, merge_adapter=merge_adapter, placement=placement
    )
    return bridge_from_hf(
        hf_model, tokenizer, name=source.path, info=source_info(source, dtype, merge_adapter)
    )


def model_info(model: TransformerBridge) -> ModelInfo:
    """The :class:`ModelInfo` of a model loaded by this toolkit (a minimal one otherwise)."""
    info = getattr(model, "piggyback_info", None)
    if info is None:
        name = str(getattr(model.cfg, "model_name", "unknown"))
        info = ModelInfo(name, name, "local", name, str(model.cfg.dtype).removeprefix("torch."))
    return info


def context_length(model: Any) -> int | None:
    """The most tokens ``model`` takes at once: its HF config's ``max_position_embeddings``.

    ``model`` is a bridge, an HF model or an HF config (a multimodal config's text part
    is read); TransformerLens's ``cfg.n_ctx`` stands in when the config has none, and
    ``None`` means the limit is unknown. Models wrapped by :func:`bridge_from_hf` also
    carry it as their tokenizer's ``model_max_length``, which
    :func:`~piggyback_interp.core.spans.chat_spans` checks every rendering against.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> context_length(model), model.tokenizer.model_max_length
        (1024, 1024)
    """
    config = hf_config(model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        limit = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(limit) if limit else None


def chat_tokenizer(model: TransformerBridge) -> Any:
    """The model's own tokenizer (not the bridge's BOS-adding copy)."""
    return getattr(model, "chat_tokenizer", model.tokenizer)
