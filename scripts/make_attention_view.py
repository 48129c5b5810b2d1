"""Write docs/img/attention_view.html: the circuitsvis attention view of one prompt on the
embedded model (layer 15, every head), tokens tagged by chat-template segment.

Usage: OMP_NUM_THREADS=1 python scripts/make_attention_view.py [--out docs/img/attention_view.html]
"""

from __future__ import annotations

import argparse

from piggyback_interp import attention_view, load_model, save_attention_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/img/attention_view.html")
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    model = load_model("smollm2-135m-instruct")
    view = attention_view(
        model,
        "How do I make new friends?",
        layer=args.layer,
        response="I have no idea about your question",
    )
    print(save_attention_view(view, args.out))


if __name__ == "__main__":
    main()
