"""A model of the same architecture, size and tokenizer as another, with random weights.

For timing on a machine the real weights cannot reach (the device machine takes at most
64 MiB of files; SmolLM2-135M's weights are 538 MB): speed depends on the shapes, not on
the values. Two steps:

    python benchmarks/random_model.py export smollm2-135m-instruct .device/smollm2-shape
    python benchmarks/random_model.py build .device/smollm2-shape /tmp/smollm2-random

``export`` copies the config and tokenizer files (no weights); ``build`` writes an HF
directory with seeded random weights that ``load_model`` loads like any other.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def export(name: str, out: Path) -> Path:
    from piggyback_interp.core.models import resolve_source

    source = Path(resolve_source(name).path)
    if name == "smollm2-135m-instruct":
        from piggyback_interp.core.embedded import embedded_model_dir

        source = Path(embedded_model_dir())
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        skip = (
            item.name.endswith(WEIGHT_SUFFIXES) or "index" in item.name or "piggyback" in item.name
        )
        if item.is_file() and not skip:  # no weights, no provenance of the real weights
            shutil.copy2(item, out / item.name)
    return out


def build(shape: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(shape)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("export", help="copy a model's config and tokenizer (no weights)")
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p = sub.add_parser("build", help="random weights for an exported shape")
    p.add_argument("shape", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.step == "export":
        print(export(args.model, args.out))
    else:
        print(build(args.shape, args.out, args.seed))


if __name__ == "__main__":
    main()
