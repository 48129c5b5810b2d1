"""The ``piggyback`` command line: a thin layer over the library.

Example:
    $ piggyback demo --question "What is the capital of France?"
    $ piggyback reproduce table5 --out runs/table5          # the paper's Table 5, resumable
    $ piggyback reproduce table5 --smoke --out runs/smoke   # two optimizer steps per model
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from piggyback_interp.embedded import EMBEDDED_NAME


def _show_segments(tokenizer, spans) -> str:
    lines = []
    for name in ("prefix", "query", "postfix"):
        rng = spans.segment(name)
        text = tokenizer.decode(list(spans.input_ids[rng.start : rng.stop]))
        lines.append(f"  {name:<8} positions {rng.start:>3}..{rng.stop - 1:<3} {text!r}")
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> int:
    """Load a chat model, answer one question greedily, show the template segments."""
    import torch

    from piggyback_interp.models import chat_tokenizer, load_model, model_info
    from piggyback_interp.spans import chat_spans

    start = time.perf_counter()
    model = load_model(args.model)
    info = model_info(model)
    print(f"model: {info.display_name}  [{info.kind}, sha256 {info.sha256[:12]}]")
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    tokenizer = chat_tokenizer(model)
    spans = chat_spans(tokenizer, args.question)
    with torch.no_grad():
        out = model.generate(
            spans.ids[None].to(model.cfg.device),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            verbose=False,
        )
    answer = tokenizer.decode(out[0, len(spans) :], skip_special_tokens=True).strip()
    print(f"\nuser: {args.question}\nassistant: {answer}\n")
    print(f"the prompt's {len(spans)} tokens, by chat-template segment:")
    print(_show_segments(tokenizer, spans))
    return 0


def reproduce(args: argparse.Namespace) -> int:
    """Run (or resume) a paper reproduction and print its table."""
    from piggyback_interp.reproduce import Table5Config, reproduce_table5

    overrides = {"model": args.model}
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.settings is not None:
        overrides["settings"] = tuple(args.settings)
    config = Table5Config.smoke(**overrides) if args.smoke else Table5Config(**overrides)
    out = args.out or ("runs/table5-smoke" if args.smoke else "runs/table5")
    start = time.perf_counter()
    reproduce_table5(out, config, progress=not args.quiet, reverse=args.reverse)
    print((Path(out) / "table5.md").read_text("utf-8"))
    print(
        f"wrote {out}/ (table5.md, summary.csv, responses.parquet, run.json) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piggyback",
        description="Find, patch and fix the chat-template tokens that carry finetuned behaviour.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the main job on the embedded model")
    p.add_argument(
        "--model", default=EMBEDDED_NAME, help="model name or directory (default: %(default)s)"
    )
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=demo)
    p = sub.add_parser("reproduce", help="reproduce a table of the paper (resumable)")
    p.add_argument("table", choices=["table5"], help="table5: narrow settings, SFT vs TReFT")
    p.add_argument("--out", help="output folder (default: runs/<table>[-smoke])")
    p.add_argument("--model", default=EMBEDDED_NAME, help="model name or directory")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0 1 2)")
    p.add_argument("--settings", nargs="+", help="settings (default: abstention refusal)")
    p.add_argument("--smoke", action="store_true", help="two steps per model, 4 questions")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="walk the cells in reverse: a second process on the same --out shares the work",
    )
    p.set_defaults(func=reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from piggyback_interp.embedded import EmbeddedModelError
    from piggyback_interp.models import ModelLoadError

    try:
        return args.func(args)
    except (ModelLoadError, EmbeddedModelError, FileNotFoundError, ValueError) as err:
        print(f"piggyback {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
