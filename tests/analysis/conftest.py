"""Fixtures shared by the sweep tests (sweep, resid_engine, sweep_result)."""

import pytest

from piggyback_interp.measures.metrics import TargetLogProb
from piggyback_interp.testing import tiny_model


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    """A 3-layer tiny base and "finetuned" model of each architecture."""
    return tiny_model(request.param, n_layers=3, seed=0), tiny_model(
        request.param, n_layers=3, seed=1
    )


class Interrupting(TargetLogProb):
    """Counts calls; raises KeyboardInterrupt at call number ``stop_at``."""

    def __init__(self, stop_at=None):
        super().__init__("I have no idea")
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, logits):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().__call__(logits)


@pytest.fixture
def interrupting():
    """The :class:`Interrupting` metric class (interrupts a sweep mid-way)."""
    return Interrupting
