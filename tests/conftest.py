"""Shared fixtures. Tests never touch the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)

from piggyback_interp.testing import ARCHS, tiny_model  # noqa: E402


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    """A tiny random bridge of each architecture (llama, qwen2, qwen3)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (built into the user cache once)."""
    from piggyback_interp.core.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def embedded_hf():
    """The same weights through plain transformers (eager attention), as an oracle."""
    from transformers import AutoModelForCausalLM

    from piggyback_interp.core.embedded import embedded_model_dir

    return AutoModelForCausalLM.from_pretrained(
        embedded_model_dir(), dtype=torch.float32, attn_implementation="eager"
    ).eval()
