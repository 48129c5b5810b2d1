"""Where the piggyback effect lives: a training-strength x trained-part x method map.

Every cell finetunes a fresh copy of the model on one narrow setting (default:
abstention) and records greedy on/off-topic rates with bootstrap intervals, graded
measures on the off-topic questions (teacher-forced ``P(target)``, its log-odds, the
next-token KL to the base), carrier shares (the gap closed by the base prefix / postfix
/ template K/V, each beside matched-count controls, in probability and log-prob space)
and the generating-position test (base residual at the last postfix position, per layer,
beside a query position). See :mod:`piggyback_interp.experiments.carriers`. The grid is
:mod:`~piggyback_interp.experiments.map_config`; one cell is
:mod:`~piggyback_interp.experiments.map_cell`.

Cells are cached: each finished cell writes a small JSON summary (no weights) into
``out/cells/`` and, with ``results_dir``, into a folder of the repository, from which a
later run on a fresh machine reads it back instead of training again. A run resumes
where it stopped; ``points`` / ``methods`` / ``trained`` select a slice.

Example:
    >>> config = MapConfig(trained=("lora_all",), points=("3e-4x1",), methods=("sft",))
    >>> [c.name for c in cells(config)]
    ['lora_all/3e-4x1/sft/seed0']
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from piggyback_interp.core.io import atomic_write_text
from piggyback_interp.core.runs import fingerprint
from piggyback_interp.experiments.map_cell import base_reference, run_cell
from piggyback_interp.experiments.map_config import METHODS, TRAINED, Cell, MapConfig, cells

MEASURES_VERSION = 1  # bump when a cell's measurement changes: older summaries are redone


# ------------------------------------------------------------------ the grid


def cell_key(cell: Cell, config: MapConfig, model_hash: str) -> dict[str, Any]:
    """What a cell's result depends on (a summary is reused only for the same key)."""
    measured = dataclasses.asdict(config)
    for name in ("trained", "points", "methods", "seeds"):
        measured.pop(name)
    return {
        "cell": cell.name,
        "method": dataclasses.asdict(cell.method),
        "model_hash": model_hash,
        "measures": MEASURES_VERSION,
        "config": measured,
    }


def _default_load(name: str) -> Any:
    if name.startswith("tiny-"):  # test models
        from piggyback_interp.testing import tiny_model

        return tiny_model(name.removeprefix("tiny-"))
    from piggyback_interp.core.models import load_model

    return load_model(name)


def _model_hash(model: Any) -> str:
    from piggyback_interp.core.models import model_info

    return model_info(model).sha256


def _summary_path(folder: Path, cell: Cell) -> Path:
    return folder / f"{cell.name}.json"


def _read_summary(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    summary = json.loads(path.read_text("utf-8"))
    return summary if summary.get("key_fingerprint") == fingerprint(key) else None


def run_map(
    out_dir: str | os.PathLike[str],
    config: MapConfig | None = None,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    load: Callable[[str], Any] = _default_load,
    progress: bool = True,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Fill the grid's missing cells and return the summary table (one row per cell).

    A cell already in ``out_dir/cells`` or in ``results_dir`` with the same key is
    read, not recomputed; each new cell is written to both as it finishes.
    """
    config = config or MapConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = load(config.model)
    base.eval()
    model_hash = _model_hash(base)
    summaries = []
    todo = cells(config)
    reference = None
    for i, cell in enumerate(todo):
        key = cell_key(cell, config, model_hash)
        paths = [_summary_path(out / "cells", cell)]
        if results_dir is not None:
            paths.append(_summary_path(Path(results_dir), cell))
        found = next((s for p in paths if (s := _read_summary(p, key))), None)
        if found is None:
            if progress:
                print(f"[map {i + 1}/{len(todo)}] {cell.name}", flush=True)
            if reference is None:
                reference = base_reference(base, config)
            found = {**run_cell(cell, config, out, load, base, reference), "key": key,
                     "key_fingerprint": fingerprint(key)}  # fmt: skip
            if progress:
                rates = {k: round(found[k]["rate"], 3) for k in ("on_topic", "off_topic")}
                print(f"[map] {cell.name}: {rates} seconds {found['seconds']}", flush=True)
        for path in paths:
            if _read_summary(path, key) is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(found, indent=1, default=str) + "\n")
        if on_cell is not None:
            on_cell(found)
        summaries.append(found)
    return map_table(summaries)


def read_summaries(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every cell summary under ``folder`` (a run's ``cells/`` or the results folder)."""
    return [json.loads(p.read_text("utf-8")) for p in sorted(Path(folder).rglob("seed*.json"))]


def _share(summary: dict[str, Any], segment: str, condition: str, space: str) -> float:
    for row in summary["carriers"]:
        if row["segment"] == segment and row["condition"] == condition:
            return row[f"share_{space}"]
    return math.nan


def _generating_max(summary: dict[str, Any], condition: str, space: str) -> float:
    values = [r[f"share_{space}"] for r in summary["generating"] if r["condition"] == condition]
    return max(values) if values else math.nan


def map_table(summaries: list[dict[str, Any]]) -> Any:
    """One row per cell: rates, graded measures and the main carrier shares."""
    import pandas as pd

    rows = []
    for s in summaries:
        row = {k: s[k] for k in ("trained", "point", "lr", "epochs", "method", "seed", "steps")}
        for split in ("on_topic", "off_topic"):
            row[split] = s[split]["rate"]
            row[f"{split}_low"], row[f"{split}_high"] = s[split]["low"], s[split]["high"]
        patched = s.get("template_patched")  # cells measured before it was recorded: NaN
        for split in ("on_topic", "off_topic"):
            row[f"{split}_patched"] = patched[split]["rate"] if patched else math.nan
        row.update({f"off_{k}": s["graded_off"][k] for k in ("p_target", "log_odds", "kl")})
        row["on_p_target"] = s["graded_on"]["p_target"]
        for seg in ("prefix", "postfix", "template"):
            for space in ("prob", "logprob"):
                row[f"{seg}_{space}"] = _share(s, seg, "all", space)
                row[f"{seg}_query_{space}"] = _share(s, seg, "query", space)
        for space in ("prob", "logprob"):
            row[f"gen_last_{space}"] = _generating_max(s, "last_postfix", space)
            row[f"gen_query_{space}"] = _generating_max(s, "query", space)
        row["seconds"] = s["seconds"]["total"]
        rows.append(row)
    if not rows:
        return pd.DataFrame(rows)
    order = {name: i for i, name in enumerate(METHODS)}
    table = pd.DataFrame(rows).assign(
        _part=lambda f: f["trained"].map(TRAINED.index),
        _strength=lambda f: f["lr"] * f["epochs"],
        _method=lambda f: f["method"].map(order),
    )
    table = table.sort_values(["_part", "_strength", "lr", "_method", "seed"], kind="stable")
    return table.drop(columns=["_part", "_strength", "_method"]).reset_index(drop=True)


HEADLINE = {
    "trained": "trained",
    "point": "lr x epochs",
    "method": "method",
    "seeds": "seeds",
    "on_topic": "on-topic",
    "off_topic": "off-topic",
    "on_topic_patched": "on-topic, base template K/V",
    "off_topic_patched": "off-topic, base template K/V",
    "off_p_target": "off P(target)",
    "template_prob": "template K/V share (P)",
    "template_query_prob": "query control (P)",
    "template_logprob": "template K/V share (log P)",
    "prefix_prob": "prefix share (P)",
    "postfix_prob": "postfix share (P)",
    "gen_last_prob": "best layer at last postfix (P)",
}


def headline(table: Any, digits: int = 2) -> Any:
    """The map's headline view: one row per (trained, point, method), mean over seeds
    (``± SE`` where there are several seeds), in grid order."""
    import pandas as pd

    keys = ["trained", "point", "method"]
    values = [c for c in HEADLINE if c not in (*keys, "seeds")]
    rows = []
    for key, group in table.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True))
        row["seeds"] = len(group)
        for column in values:
            x = group[column].astype(float).dropna()  # older cells lack some measures
            mean = x.mean() if len(x) else math.nan
            if len(x) > 1:
                se = x.std(ddof=1) / math.sqrt(len(x))
                row[column] = f"{mean:.{digits}f} ± {se:.{digits}f}"
            else:
                row[column] = "n/a" if math.isnan(mean) else f"{mean:.{digits}f}"
        rows.append(row)
    return pd.DataFrame(rows).rename(columns=HEADLINE)


__all__ = ["MEASURES_VERSION", "cell_key", "headline", "map_table", "read_summaries", "run_map"]
