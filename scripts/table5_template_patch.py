"""Extra Table 5 rows: the SFT models of a finished ``piggyback reproduce table5`` run,
evaluated with the base model's K/V patched at every layer on the prefix, the postfix
(from the empty-query prompt), or both. Prints JSON, one line per (setting, seed, patch).

Usage: OMP_NUM_THREADS=1 python scripts/table5_template_patch.py runs/table5 [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from piggyback_interp.experiments.reproduce import Table5Config, _data, _finetune, _load, _tokenizer
from piggyback_interp.interventions.generation import PatchSpec
from piggyback_interp.measures.evaluation import evaluate
from piggyback_interp.measures.settings import setting_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    config = Table5Config(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads((args.run / "config.json").read_text()).items()
        }
    )
    base = _load(config.model)
    for name in config.settings:
        data = _data(setting_data(name, tokenizer=_tokenizer(base)), config)
        for seed in args.seeds:
            # resume=True on the finished checkpoint: the trained weights, no new steps
            model = _finetune(args.run, _load, data, "sft", seed, None, config, progress=False)
            for segments in (("prefix",), ("postfix",), ("prefix", "postfix")):
                patch = [PatchSpec(base, site="kv", segment=s) for s in segments]
                start = time.perf_counter()
                result = evaluate(model, data, patch=patch, max_new_tokens=config.max_new_tokens)
                row = {
                    "setting": name,
                    "seed": seed,
                    "patch": "+".join(segments) + " K/V",
                    "on_topic": round(result.rate("on_topic"), 3),
                    "off_topic": round(result.rate("off_topic"), 3),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
