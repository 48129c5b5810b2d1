"""What produced a result: library versions and the machine, recorded next to every output.

Example:
    >>> sorted(versions())[:3]
    ['peft', 'piggyback_interp', 'python']
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on."""
    from importlib.metadata import version

    import peft
    import torch
    import transformers

    from piggyback_interp import __version__

    return {
        "python": platform.python_version(),
        "piggyback_interp": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": version("transformer-lens"),  # the module has no __version__
        "peft": peft.__version__,
    }


def machine() -> dict[str, object]:
    """The machine a result ran on: platform, processor, CPU count, accelerator."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "executable": Path(sys.executable).name,
    }


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_write_parquet(frame: Any, path: str | os.PathLike[str]) -> Path:
    """Write a pandas DataFrame to ``path`` as parquet through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp)
    os.replace(tmp, path)
    return path


__all__ = ["atomic_write_parquet", "atomic_write_text", "machine", "versions"]
