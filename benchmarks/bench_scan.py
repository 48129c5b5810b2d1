"""`piggyback scan` (or the full `piggyback demo`) before and after a change, timed side
by side on one machine.

Runs the CLI command ``piggyback scan --finetuned ADAPTER`` (every layer, the 8 shipped
general prompts, every other default), or with ``--demo`` the main job ``piggyback demo``
(every default: three finetunes, five evaluations, the graded step, the scan of the SFT
model), twice: with the package as it was at ``--before`` (a git revision, checked out
into a temporary worktree) and as it is at ``--after``. With
``--parallel`` both run at once, each with ``--threads`` torch threads, so that they see
the same machine load (the ratio is the reliable part on a shared machine); otherwise
one after the other. Prints JSON: the wall seconds and per-step seconds of each, the
ratio, and how far their numbers differ (segment patching, K/V layer patching and the
perturbations must agree; the residual sweep is compared at the cells both patched
exactly, and by its largest exactly patched cell; for the demo also its greedy rates,
how many answers changed, and its graded measures).

    OMP_NUM_THREADS=1 python benchmarks/bench_scan.py --finetuned runs/demo/finetune/sft/adapter \
        --before 58a90af --after HEAD --parallel --threads 1 --json
    OMP_NUM_THREADS=1 python benchmarks/bench_scan.py --demo \
        --before 58a90af --after HEAD --parallel --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("perturbation", "patching", "layers", "resid")


def _command(code: Path, adapter: str | None, out: Path, threads: int) -> tuple[list[str], dict]:
    """The scan (or, without an adapter, demo) command run from ``code`` (its cwd, so
    ``python -m`` imports that code)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-W", "ignore", "-m", "piggyback_interp.cli"]
    if adapter is None:
        argv += ["demo", "--threads", str(threads)]
    else:
        argv += ["scan", "--finetuned", str(Path(adapter).resolve())]
    return [*argv, "--out", str(out), "--quiet"], env


def _parts(out: Path, demo: bool) -> dict:
    from piggyback_interp.experiments.registry import EXPERIMENTS

    folder = out / "scan" / "sft" if demo else out / "scan"
    return {step: EXPERIMENTS[step].load(folder) for step in STEPS}


def _steps(out: Path, demo: bool) -> dict[str, float]:
    run = json.loads((out / "run.json").read_text("utf-8"))
    return {
        (k if demo else k.split("/")[-1]): round(v["seconds"] or 0, 1)
        for k, v in run["steps"].items()
    }


def _max_diff(a, b, column: str) -> float:
    return float((a[column] - b[column]).abs().max())


def _exact(resid) -> list[tuple[int, int]]:
    """The (layer, position) cells patched exactly (all of them without a pre-screen)."""
    if resid.meta.get("method") == "atp_prescreen":
        return [tuple(cell) for cell in resid.meta["exact_cells"]]
    return [(layer, pos) for layer in resid.layers for pos in resid.positions]


def _resid(before, after) -> dict:
    """The largest exactly patched cell of each, and their difference where both are exact."""
    out = {}
    for name, resid in (("before", before), ("after", after)):
        mean = resid.recovery().nanmean(0)
        cells = _exact(resid)
        values = [
            float(mean[resid.layers.index(lay), resid.positions.index(pos)]) for lay, pos in cells
        ]
        best = max(range(len(cells)), key=values.__getitem__)
        out[f"best_{name}"] = {"cell": list(cells[best]), "recovery": round(values[best], 4)}
    both = set(_exact(before)) & set(_exact(after))
    out["exact_cells_after"] = len(_exact(after))
    out["max_abs_diff_at_exact_cells"] = max(
        float(
            (
                before.values[:, before.layers.index(lay), before.positions.index(pos)]
                - after.values[:, after.layers.index(lay), after.positions.index(pos)]
            )
            .abs()
            .max()
        )
        for lay, pos in both
    )
    return out


def _demo_outputs(before: Path, after: Path) -> dict:
    """How far the demo's own outputs moved: per evaluation, the behaviour rate on each
    split and how many greedy answers changed; per graded model, the largest change of
    log P(target) and KL over prompts, and of the template shares."""
    import pandas as pd

    out: dict = {"evaluations": {}, "graded": {}}
    for path in sorted((before / "evaluate").glob("*/evaluation.parquet")):
        name = path.parent.name
        a, b = pd.read_parquet(path), pd.read_parquet(after / "evaluate" / name / path.name)
        rates = {
            split: [round(float(x[x["split"] == split]["behaviour"].mean()), 4) for x in (a, b)]
            for split in sorted(a["split"].unique())
        }
        out["evaluations"][name] = {
            "rates_before_after": rates,
            "answers_changed": int((a["response"].to_numpy() != b["response"].to_numpy()).sum()),
            "answers": len(a),
        }
    for path in sorted((before / "graded").glob("*/graded.parquet")):
        name = path.parent.name
        a, b = pd.read_parquet(path), pd.read_parquet(after / "graded" / name / path.name)
        ca = pd.read_parquet(path.parent / "carriers.parquet")
        cb = pd.read_parquet(after / "graded" / name / "carriers.parquet")
        out["graded"][name] = {
            "logp": float((a["logp"] - b["logp"]).abs().max()),
            "kl": float((a["kl"] - b["kl"]).abs().max()),
            "carrier_logp": float((ca["logp"] - cb["logp"]).abs().max()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--finetuned", help="the SFT adapter to scan")
    what.add_argument("--demo", action="store_true", help="time the full demo instead")
    parser.add_argument("--before", default="58a90af", help="git revision of the old code")
    parser.add_argument("--after", default="HEAD", help="git revision of the new code")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", action="store_true", help="run both at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = {"before": tmp / "before-code", "after": tmp / "after-code"}
        for name, rev in (("before", args.before), ("after", args.after)):
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(code[name]), rev],
                check=True,
            )
        try:
            jobs = {
                name: _command(code[name], args.finetuned, tmp / name, args.threads)
                for name in ("before", "after")
            }
            wall = {}
            if args.parallel:
                start = time.perf_counter()
                procs = {k: subprocess.Popen(a, env=e, cwd=code[k]) for k, (a, e) in jobs.items()}
                pending = dict(procs)
                while pending:
                    for k, p in list(pending.items()):
                        if p.poll() is not None:
                            if p.returncode:
                                raise SystemExit(f"{k} scan failed ({p.returncode})")
                            wall[k] = time.perf_counter() - start
                            del pending[k]
                    time.sleep(1)
            else:
                for k, (a, e) in jobs.items():
                    start = time.perf_counter()
                    subprocess.run(a, env=e, check=True, cwd=code[k])
                    wall[k] = time.perf_counter() - start
            timing = {
                "before_rev": args.before,
                "after_rev": args.after,
                "threads": args.threads,
                "parallel": args.parallel,
                "before_s": round(wall["before"], 1),
                "after_s": round(wall["after"], 1),
                "ratio": round(wall["after"] / wall["before"], 3),
                "command": "demo" if args.demo else "scan",
                "before_steps": _steps(tmp / "before", args.demo),
                "after_steps": _steps(tmp / "after", args.demo),
            }
            print(json.dumps(timing), file=sys.stderr)  # kept even if a comparison fails
            before, after = _parts(tmp / "before", args.demo), _parts(tmp / "after", args.demo)
            result = {
                **timing,
                "max_abs_diff": {
                    "perturbation_reduction": _max_diff(
                        before["perturbation"], after["perturbation"], "reduction"
                    ),
                    "patching_recovery": _max_diff(
                        before["patching"], after["patching"], "recovery"
                    ),
                    "layers_recovery": _max_diff(before["layers"], after["layers"], "recovery"),
                },
                "resid": _resid(before["resid"], after["resid"]),
            }
            if args.demo:
                result["demo_outputs"] = _demo_outputs(tmp / "before", tmp / "after")
        finally:
            for path in code.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                    check=False,
                )
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
