"""Time loading the embedded model from its cache (target: < 10 s once built).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_load.py --json
Prints {"build_s", "load_s", "load_target_s", "ok"}; build_s is 0 when the cache existed.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.parse_args()

    from piggyback_interp.core.embedded import embedded_model_dir
    from piggyback_interp.core.models import load_model

    start = time.perf_counter()
    embedded_model_dir()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    load_model("smollm2-135m-instruct")
    load_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "build_s": round(build_s, 2),
                "load_s": round(load_s, 2),
                "load_target_s": 10,
                "ok": load_s < 10,
            }
        )
    )


if __name__ == "__main__":
    main()
