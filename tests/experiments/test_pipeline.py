"""The demo's cached steps: graded_step shares the base model's runs across models."""

from __future__ import annotations

import functools

import pandas as pd

from piggyback_interp.core.runs import RunDir
from piggyback_interp.experiments.carriers import base_runs
from piggyback_interp.experiments.pipeline import graded_step
from piggyback_interp.testing import tiny_model

TARGET = "I have no idea"
PROMPTS = ["Hi there, how are you today?", "Tell me a joke about cats please."]


def test_graded_step_with_a_shared_reference_equals_its_own_base_runs(tmp_path):
    base = tiny_model("llama", seed=0)
    models = {"a": tiny_model("llama", seed=1), "b": tiny_model("llama", seed=2)}
    calls = []

    def runs():
        calls.append(1)
        return base_runs(base, PROMPTS, TARGET)

    reference = functools.cache(runs)
    shared = RunDir(tmp_path / "shared")
    alone = RunDir(tmp_path / "alone")
    for name, model in models.items():
        got = graded_step(shared, f"graded/{name}", base, model, PROMPTS, TARGET,
                          reference=reference)  # fmt: skip
        want = graded_step(alone, f"graded/{name}", base, model, PROMPTS, TARGET)
        for part in ("graded", "values"):
            pd.testing.assert_frame_equal(got[part], want[part], atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # the base ran once for both models
    # a cached step reads its files back and never asks for the base runs
    fresh = functools.cache(runs)
    graded_step(shared, "graded/a", base, models["a"], PROMPTS, TARGET, reference=fresh)
    assert len(calls) == 1
