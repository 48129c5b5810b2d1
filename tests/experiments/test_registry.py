"""The one registry of the scan's experiments: find_carriers, ScanResult and the cached
pipeline steps all read it."""

import dataclasses

import pandas as pd

from piggyback_interp.core.runs import RunDir
from piggyback_interp.experiments.pipeline import scan_step
from piggyback_interp.experiments.registry import EXPERIMENTS
from piggyback_interp.experiments.scan import ScanResult, find_carriers
from piggyback_interp.experiments.scan_config import ScanConfig
from piggyback_interp.testing import tiny_model

PROMPTS = ["How do I boil an egg?", "Name a large city."]


def test_cache_fields_are_scan_config_fields():
    fields = {f.name for f in dataclasses.fields(ScanConfig)}
    for experiment in EXPERIMENTS.values():
        assert experiment.fields <= fields, experiment.name
    assert "resid_atp_top_k" in EXPERIMENTS["resid"].fields
    assert list(EXPERIMENTS) == ["perturbation", "patching", "layers", "resid"]
    assert [e.name for e in EXPERIMENTS.values() if e.resumable] == ["layers", "resid"]


def _stub(monkeypatch, calls):
    """Replace the layer experiment by a stub that records its calls."""

    def layers(base, model, prompts, config, *, progress, **kwargs):
        calls.append(kwargs)
        return pd.DataFrame(
            {"prompt": [0], "condition": ["query"], "layer": [0], "recovery": [0.5]}
        )

    monkeypatch.setitem(
        EXPERIMENTS, "layers", dataclasses.replace(EXPERIMENTS["layers"], run=layers)
    )


def test_find_carriers_and_the_cached_scan_run_what_the_registry_lists(tmp_path, monkeypatch):
    base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    config = ScanConfig(trials=1, resid_sweep=False)
    calls = []
    _stub(monkeypatch, calls)
    result = find_carriers(base, tuned, PROMPTS, config, progress=False)
    assert calls == [{}] and result.layers["recovery"].tolist() == [0.5]
    assert result.resid is None  # disabled by the config: not run
    cached = scan_step(
        RunDir(tmp_path / "run"), "scan", base, tuned, PROMPTS, config, progress=False
    )
    assert len(calls) == 2 and "checkpoint" in calls[1]  # a resumable step gets a checkpoint
    assert cached.layers["recovery"].tolist() == [0.5]
    for name, experiment in EXPERIMENTS.items():
        assert (tmp_path / "run" / "scan" / experiment.path).exists() == (name != "resid")
    loaded = ScanResult.load(tmp_path / "run" / "scan")
    assert loaded.layers["recovery"].tolist() == [0.5] and loaded.resid is None
    assert loaded.verdict.headline == result.verdict.headline
