"""ScanConfig refuses what cannot run, and takes its options as strings or enums."""

import pytest

from piggyback_interp.core.errors import UserError
from piggyback_interp.experiments.scan_config import GapMetric, ScanConfig
from piggyback_interp.interventions.perturb import PerturbMode


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segments": ("query",)}, r"segments must be template segments.*got \('query',\)"),
        ({"segments": ()}, "segments must be template segments"),
        ({"metric": "logprob"}, "metric must be one of kl, target, got 'logprob'"),
        ({"metric": "target"}, "metric='target' needs target="),
        ({"metric": "target", "target": ""}, "metric='target' needs target="),
        ({"trials": 0}, "trials must be >= 1, got 0"),
        ({"min_recovery": 0.0}, r"min_recovery must be in \(0, 1\], got 0.0"),
        ({"min_recovery": 1.5}, r"min_recovery must be in \(0, 1\]"),
    ],
)
def test_scan_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScanConfig(**kwargs)


@pytest.mark.parametrize(("field", "kind"), [("metric", GapMetric), ("perturb_mode", PerturbMode)])
def test_scan_string_options_are_enums(field, kind):
    import dataclasses
    import json

    for member in kind:
        by_string = ScanConfig(target="I have no idea", **{field: member.value})
        assert by_string == ScanConfig(target="I have no idea", **{field: member})
        assert getattr(by_string, field) is member
        saved = json.loads(json.dumps(dataclasses.asdict(by_string)))
        assert type(saved[field]) is str and saved[field] == member.value
        again = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        assert ScanConfig(**again) == by_string
    choices = ", ".join(kind.values())
    with pytest.raises(UserError, match=f"^{field} must be one of {choices}, got 'bogus'$"):
        ScanConfig(**{field: "bogus"})
