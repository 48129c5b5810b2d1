"""What produced a result: library versions and the machine, recorded next to every output.

The atomic writers once defined here (``atomic_write_text``, ``atomic_write_parquet``)
live in :mod:`piggyback_interp.core.io` and are importable from here too.

Example:
    >>> sorted(versions())[:3]
    ['peft', 'piggyback_interp', 'python']
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# the atomic writers live in piggyback_interp.core.io; importable from here as before
from piggyback_interp.core.io import atomic_write_parquet, atomic_write_text


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


__all__ = ["atomic_write_parquet", "atomic_write_text", "machine", "versions"]
