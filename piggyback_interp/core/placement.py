"""Where a big model's weights go: Hugging Face ``device_map`` over GPUs, or CPU and disk.

:class:`Placement` is what :func:`~piggyback_interp.core.models.load_model` and
:func:`~piggyback_interp.core.pairs.load_pair` take; the helpers below check a placed
model, find the device its inputs go to, and load a LoRA adapter onto an offloaded one.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from piggyback_interp.core.hf import PEFT_PREFIX

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


def load_adapter(model: Any, adapter_path: str, placement: Placement | None, name: str) -> Any:
    """peft's ``PeftModel`` of ``model`` with the adapter at ``adapter_path`` (not
    trainable); on a CPU/disk-offloaded model the adapter is offloaded beside it."""
    from peft import PeftModel

    placed = _adapter_placement(model, placement, name)
    with warnings.catch_warnings(), _working_dir(placed.get("offload_folder")):
        # on offloaded layers peft first loads into meta tensors, then re-dispatches
        # with the real weights (tests/core/test_placement.py checks the result)
        warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint")
        peft_model = PeftModel.from_pretrained(
            model, str(Path(adapter_path).resolve()), is_trainable=False, **placed
        )
        if placed:
            _absolute_offload_paths(peft_model, placed["offload_folder"])
    return peft_model


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


def unknown_modules(model: Any, placement: Placement) -> str | None:
    """What is wrong with a device map naming modules the model lacks (transformers
    silently ignores them), with the names to use instead; ``None`` if nothing is."""
    if not isinstance(placement.device_map, dict):
        return None
    names = dict(model.named_modules())
    unknown = [k for k in placement.device_map if k and k not in names]
    if not unknown:
        return None
    tops = sorted({n.rsplit(".", 1)[0] for n in names if n.count(".") == 2 and "layers" in n})
    return (
        f"device_map names modules it does not have: "
        f"{unknown}; use names like 'model.embed_tokens', {tops[:1] or ['model.layers']}"
        "[.i], 'lm_head' (or device_map='auto')"
    )


def execution_device(hf_model: Any) -> str:
    """The device inputs go to: accelerate's execution device for a placed model (its
    parameters may sit on the meta device, offloaded), else the first parameter's."""
    for module in hf_model.modules():  # the model itself first
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return str(torch.device(hook.execution_device))
    return str(next(hf_model.parameters()).device)
