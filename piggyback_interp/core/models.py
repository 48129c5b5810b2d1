"""Load chat models as TransformerLens 4 ``TransformerBridge`` objects, alone or in pairs.

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

import atexit
import contextlib
import copy
import functools
import gc
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

from piggyback_interp.core.display import Summarized
from piggyback_interp.core.embedded import (
    EMBEDDED_DISPLAY_NAME,
    EMBEDDED_NAME,
    cache_root,
    embedded_model_dir,
    read_manifest,
    sha256_file,
)
from piggyback_interp.core.errors import ModelError, UserError
from piggyback_interp.core.hf import PEFT_PREFIX, hf_config

SourceKind = Literal["embedded", "local", "hub", "adapter"]
ADAPTER_CONFIG = "adapter_config.json"


class ModelLoadError(ModelError, OSError):
    """A model could not be found or loaded; the message says how to fix it."""


class IncompatiblePairError(UserError):
    """A base and a finetuned model that cannot be compared position by position."""


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
        import hashlib

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


DeviceMap = str | dict[str, Any]


@dataclass(frozen=True)
class Placement:
    """Where a big model's weights go (inference only), as Hugging Face ``device_map``.

    ``device_map="auto"`` spreads the layers over every visible GPU (then CPU, then
    disk); a dict maps module names to ``0``, ``"cuda:1"``, ``"cpu"`` or ``"disk"``.
    TransformerLens runs a model split over several GPUs, or over CPU and disk, but not
    GPU and offload mixed. ``max_memory`` caps each device (``{0: "70GiB", "cpu":
    "100GiB"}``); ``offload_folder`` holds the weights placed on ``"disk"``.

    Example:
        >>> Placement("auto", max_memory={0: "70GiB", 1: "70GiB"}).kwargs()["device_map"]
        'auto'
    """

    device_map: DeviceMap
    max_memory: dict[int | str, str] | None = None
    offload_folder: str | None = None

    def kwargs(self, model_name: str = "model") -> dict[str, Any]:
        """The ``from_pretrained`` arguments; each model offloads into its own subfolder
        (two models in one folder would overwrite each other's weights)."""
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = self.max_memory
        if self.offload_folder:
            out["offload_folder"] = self.folder(model_name)
        return out

    def folder(self, model_name: str) -> str:
        """This model's offload subfolder (a temporary one without ``offload_folder``)."""
        root = self.offload_folder
        if root is None:
            root = tempfile.mkdtemp(prefix="piggyback-offload-")
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        return str(Path(root).resolve() / hashlib.sha256(model_name.encode()).hexdigest()[:12])


def _load_hf(
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
    if placement is not None:
        _check_placed(model, placement, source)
    if source.adapter_path:
        from peft import PeftModel

        placed = _adapter_placement(model, placement, source.name)
        with warnings.catch_warnings(), _working_dir(placed.get("offload_folder")):
            # on offloaded layers peft first loads into meta tensors, then re-dispatches
            # with the real weights (tests/test_placement.py checks the result)
            warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint")
            peft_model = PeftModel.from_pretrained(
                model, str(Path(source.adapter_path).resolve()), is_trainable=False, **placed
            )
            if placed:
                _absolute_offload_paths(peft_model, placed["offload_folder"])
        model = peft_model.merge_and_unload() if merge_adapter else peft_model.base_model.model
    return (model if placement else model.to(device)).eval()


@contextlib.contextmanager
def _working_dir(folder: str | None) -> Iterator[None]:
    """Run inside ``folder`` (made if needed): peft 0.21 writes copies of disk-offloaded
    weight files at their absolute path made relative, i.e. under the working directory."""
    if folder is None:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def _absolute_offload_paths(model: Any, folder: str) -> None:
    """Point accelerate's offload index at the copies peft wrote under ``folder`` (it
    records them relative to the working directory of the time)."""
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        index = getattr(getattr(weights, "dataset", None), "index", None) or {}
        for entry in index.values():
            file = entry.get("safetensors_file") if isinstance(entry, dict) else None
            if file and not os.path.isabs(file):
                entry["safetensors_file"] = os.path.join(folder, file)


def _adapter_placement(model: Any, placement: Placement | None, name: str) -> dict[str, Any]:
    """peft re-dispatches a CPU/disk-offloaded model with its adapter: it needs the
    realised map under its own module names and a folder for the offloaded LoRA weights."""
    realised = getattr(model, "hf_device_map", None) or {}
    if placement is None or not {"cpu", "disk"} & {str(v) for v in realised.values()}:
        return {}
    prefix = PEFT_PREFIX.rstrip(".")
    return {
        "device_map": {f"{prefix}.{k}" if k else prefix: v for k, v in realised.items()},
        "offload_folder": str(Path(placement.folder(name)) / "adapter"),
    }


def _check_placed(model: Any, placement: Placement, source: ModelSource) -> None:
    """A device map naming modules the model lacks is silently ignored by transformers."""
    if not isinstance(placement.device_map, dict):
        return
    names = dict(model.named_modules())
    unknown = [k for k in placement.device_map if k and k not in names]
    if unknown:
        tops = sorted({n.rsplit(".", 1)[0] for n in names if n.count(".") == 2 and "layers" in n})
        raise ModelLoadError(
            f"could not place {source.name}: device_map names modules it does not have: "
            f"{unknown}; use names like 'model.embed_tokens', {tops[:1] or ['model.layers']}"
            "[.i], 'lm_head' (or device_map='auto')"
        )


def _execution_device(hf_model: Any) -> str:
    """The device inputs go to: accelerate's execution device for a placed model (its
    parameters may sit on the meta device, offloaded), else the first parameter's."""
    for module in hf_model.modules():  # the model itself first
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return str(torch.device(hook.execution_device))
    return str(next(hf_model.parameters()).device)


def _display_name(source: ModelSource) -> str:
    if source.kind == "embedded":
        return EMBEDDED_DISPLAY_NAME
    if source.kind == "adapter" and source.base is not None:
        return f"{_display_name(source.base)} + LoRA adapter {source.name}"
    return source.name


def _info(source: ModelSource, dtype: torch.dtype, merge_adapter: bool) -> ModelInfo:
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
        bridge.cfg.device = _execution_device(hf_model)
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
    hf_model = _load_hf(
        source, device=device, dtype=dtype, merge_adapter=merge_adapter, placement=placement
    )
    return bridge_from_hf(
        hf_model, tokenizer, name=source.path, info=_info(source, dtype, merge_adapter)
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


# ---------------------------------------------------------------- pairs


_ARCH_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_SPECIAL_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _first_difference(a: str, b: str) -> str:
    for i, (la, lb) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if la != lb:
            return f"line {i + 1}: {la!r} vs {lb!r}"
    return f"one template is longer ({len(a)} vs {len(b)} characters)"


def pair_differences(base_config: Any, base_tok: Any, ft_config: Any, ft_tok: Any) -> list[str]:
    """Every reason two models cannot be compared position by position (empty: compatible)."""
    problems = []
    for name in _ARCH_FIELDS:
        a, b = getattr(base_config, name, None), getattr(ft_config, name, None)
        if a != b:
            problems.append(
                f"architecture: {name} is {a!r} in the base and {b!r} in the finetuned model"
            )
    va, vb = base_tok.get_vocab(), ft_tok.get_vocab()
    if va != vb:
        differ = sorted(set(va.items()) ^ set(vb.items()))
        problems.append(
            f"vocabulary: {len(differ)} (token, id) entries differ, e.g. {differ[0]!r}; "
            "use the same tokenizer for both models"
        )
    for name in _SPECIAL_FIELDS:
        a, b = getattr(base_tok, name, None), getattr(ft_tok, name, None)
        if a != b:
            problems.append(
                f"special tokens: {name} is {a!r} in the base and {b!r} in the finetuned model"
            )
    if sorted(base_tok.all_special_tokens) != sorted(ft_tok.all_special_tokens):
        problems.append(
            "special tokens: the sets differ: "
            f"{sorted(set(base_tok.all_special_tokens) ^ set(ft_tok.all_special_tokens))}"
        )
    ta, tb = base_tok.chat_template or "", ft_tok.chat_template or ""
    if ta != tb:
        problems.append(
            f"chat template differs ({_first_difference(ta, tb)}); the template positions "
            "must be the same tokens in both models: pass the base's template to the finetuned tokenizer"
        )
    return problems


def _check_pair(base_config: Any, base_tok: Any, ft_config: Any, ft_tok: Any) -> None:
    problems = pair_differences(base_config, base_tok, ft_config, ft_tok)
    if problems:
        raise IncompatiblePairError(
            "the base and finetuned models cannot be compared position by position:\n  - "
            + "\n  - ".join(problems)
        )


class BaseReleasedError(RuntimeError):
    """The pair's base model was released to save memory."""


@dataclass(repr=False)
class ModelPair(Summarized):
    """A base (initial) model and a finetuned one with the same tokens and template.

    ``reference`` holds whatever was computed from the base before it was released
    (the memory-lean path of :func:`load_pair`); ``base`` is then unavailable.
    ``shared``: the two models hold ONE copy of the base weights (see :func:`load_pair`).
    Printed, it names the two models and their shape, never their module trees.
    """

    finetuned: TransformerBridge
    tokenizer: Any
    _base: TransformerBridge | None = None
    reference: Any = None
    shared: bool = False  # one copy of the base weights: finetuned = base + unmerged LoRA

    @property
    def base(self) -> TransformerBridge:
        if self._base is None:
            raise BaseReleasedError(
                "the base model was released (memory-lean pair); use pair.reference, or "
                "load the pair without reference= to keep both models"
            )
        return self._base

    @property
    def has_base(self) -> bool:
        return self._base is not None

    def _facts(self) -> dict[str, Any]:
        cfg = self.finetuned.cfg
        return {
            "base": model_info(self._base).display_name if self.has_base else "released",
            "finetuned": model_info(self.finetuned).display_name,
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "device": str(next(self.finetuned.parameters()).device),
            "shared": self.shared,
            "reference": None if self.reference is None else type(self.reference).__name__,
        }

    def release_base(self) -> None:
        """Drop the base model and free its memory (and CUDA cache)."""
        self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _config_and_tokenizer(model: TransformerBridge | str | os.PathLike[str]) -> tuple[Any, Any]:
    """(config, tokenizer) of a loaded bridge or of a model name, without loading weights."""
    if isinstance(model, TransformerBridge):
        return hf_config(model), chat_tokenizer(model)
    source = resolve_source(model)
    return load_config(source), load_tokenizer(source)


SHARED_ATTR = "_piggyback_shared"  # set on parameters that two models of a pair hold


def shares_weights(param: torch.Tensor) -> bool:
    """Whether ``param`` is held by both models of a shared-base pair (editing it in
    place would change both: swap it in one model instead, as task vectors do)."""
    return bool(getattr(param, SHARED_ATTR, False))


def _shared_base_problem(
    base: TransformerBridge | str | os.PathLike[str],
    finetuned: TransformerBridge | str | os.PathLike[str],
    merge_adapter: bool | None,
    placement: Placement | None,
) -> str | None:
    """Why the pair cannot share one copy of the base weights (None: it can, exactly)."""
    if isinstance(base, TransformerBridge) or isinstance(finetuned, TransformerBridge):
        return "the models are already loaded (pass names or directories instead)"
    ft_source, base_source = resolve_source(finetuned), resolve_source(base)
    if ft_source.kind != "adapter" or ft_source.adapter_path is None:
        return f"the finetuned model {ft_source.name!r} is not a LoRA adapter directory"
    peft_type = json.loads((Path(ft_source.adapter_path) / ADAPTER_CONFIG).read_text()).get(
        "peft_type"
    )
    if peft_type != "LORA":
        return f"the adapter is a {peft_type} adapter, not LoRA"
    if base_source.kind == "adapter" or ft_source.path != base_source.path:
        return (
            f"the adapter applies to {ft_source.path!r}, not to the pair's base "
            f"{base_source.path!r}"
        )
    if merge_adapter:
        return "merge_adapter=True merges the adapter into a copy of its own"
    if placement is not None:
        return "placement= (a model spread over devices) is loaded as two copies"
    return None


def _load_shared(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    device: str,
    dtype: torch.dtype,
) -> tuple[TransformerBridge, TransformerBridge]:
    """(base, finetuned) bridges over ONE copy of the base weights.

    The finetuned HF model is a copy of the base's module tree whose parameters are the
    base's own tensors (``deepcopy`` with every parameter memoised to itself), with the
    LoRA adapter injected unmerged. Each model has its own modules and so its own bridge
    and hooks; nothing is toggled, so no state can be left behind.
    """
    from peft import PeftModel

    base_source, ft_source = resolve_source(base), resolve_source(finetuned)
    assert ft_source.adapter_path is not None
    base_hf = _load_hf(base_source, device=device, dtype=dtype, merge_adapter=False)
    memo: dict[int, Any] = {id(p): p for p in base_hf.parameters()}
    ft_hf = copy.deepcopy(base_hf, memo)
    peft_model = PeftModel.from_pretrained(
        ft_hf, str(Path(ft_source.adapter_path).resolve()), is_trainable=False
    )
    ft_hf = peft_model.base_model.model.eval()
    for param in base_hf.parameters():  # peft froze them: the same tensors in both models
        setattr(param, SHARED_ATTR, True)
    return (
        bridge_from_hf(
            base_hf,
            load_tokenizer(base_source),
            name=base_source.path,
            info=_info(base_source, dtype, False),
        ),
        bridge_from_hf(
            ft_hf,
            load_tokenizer(ft_source),
            name=ft_source.path,
            info=_info(ft_source, dtype, False),
        ),
    )


def load_pair(
    base: TransformerBridge | str | os.PathLike[str],
    finetuned: TransformerBridge | str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    merge_adapter: bool | None = None,
    reference: Callable[[TransformerBridge], Any] | None = None,
    placement: Placement | None = None,
    shared: bool | None = None,
) -> ModelPair:
    """Load (or pair already-loaded) base and finetuned models, checked compatible.

    Compatibility (architecture, vocabulary, special tokens, chat template) is
    checked from configs and tokenizers BEFORE any weights are read; a mismatch
    raises :class:`IncompatiblePairError` naming each difference.

    Shared base (the default where it is exact): when ``finetuned`` is a LoRA adapter
    directory on ``base`` itself, the pair holds ONE copy of the base weights;
    ``pair.finetuned`` runs them with the adapter unmerged, ``pair.base`` without it
    (``pair.shared`` is True). Both are ordinary, independent bridges: hooks, caches,
    generation and weight reading work on each unchanged. ``shared=False`` loads two
    copies (the adapter merged unless ``merge_adapter=False``); ``shared=True`` raises
    :class:`~piggyback_interp.core.errors.UserError` where sharing is impossible.
    ``merge_adapter`` (default: merged for two copies, unmerged for a shared pair)
    applies to adapters loaded as a copy of their own; ``merge_adapter=True`` implies two
    copies.

    Memory-lean path: with ``reference=fn``, the base is loaded first,
    ``pair.reference = fn(base)`` is computed (under ``torch.no_grad``), the base
    is released, and only then is the finetuned model loaded, so peak memory is
    about one model.

    Example:
        >>> pair = load_pair("smollm2-135m-instruct", "runs/sft/model")  # doctest: +SKIP
        >>> pair.base.cfg.n_layers == pair.finetuned.cfg.n_layers        # doctest: +SKIP
        True
    """
    base_cfg, base_tok = _config_and_tokenizer(base)
    ft_cfg, ft_tok = _config_and_tokenizer(finetuned)
    _check_pair(base_cfg, base_tok, ft_cfg, ft_tok)

    if shared is not False:
        problem = _shared_base_problem(base, finetuned, merge_adapter, placement)
        if problem is None:
            assert not isinstance(base, TransformerBridge)
            assert not isinstance(finetuned, TransformerBridge)
            base_model, ft_model = _load_shared(base, finetuned, device=device, dtype=dtype)
            if reference is None:
                return ModelPair(ft_model, base_tok, base_model, shared=True)
            with torch.no_grad():
                ref = reference(base_model)
            return ModelPair(ft_model, base_tok, None, ref, shared=True)
        if shared:
            from piggyback_interp.core.errors import UserError

            raise UserError(
                f"cannot share one copy of the base weights: {problem}. Sharing needs a "
                "LoRA adapter directory on the pair's own base, unmerged, without "
                "placement=; pass shared=False to load two copies"
            )

    def materialise(model: TransformerBridge | str | os.PathLike[str]) -> TransformerBridge:
        if isinstance(model, TransformerBridge):
            return model
        return load_model(
            model,
            device=device,
            dtype=dtype,
            merge_adapter=merge_adapter is not False,
            placement=placement,
        )

    if reference is None:
        return ModelPair(materialise(finetuned), base_tok, materialise(base))
    base_model = materialise(base)
    with torch.no_grad():
        ref = reference(base_model)
    del base_model
    gc.collect()
    return ModelPair(materialise(finetuned), base_tok, None, ref)
