"""The real embedded model: cache build, logits vs transformers, chat, cached generation."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from piggyback_interp.core.embedded import (
    EMBEDDED_NAME,
    cache_is_valid,
    embedded_model_dir,
    read_manifest,
    sha256_file,
)
from piggyback_interp.core.models import chat_tokenizer, model_info

pytestmark = pytest.mark.embedded

QUESTION = "What is the capital of France?"


def _chat_ids(model, question=QUESTION):
    tok = chat_tokenizer(model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def test_logits_equal_plain_transformers(embedded, embedded_hf):
    for question in (QUESTION, "Can my landlord keep my deposit?"):
        ids = _chat_ids(embedded, question)
        with torch.no_grad():
            diff = (embedded(ids) - embedded_hf(ids).logits).abs().max().item()
        assert diff <= 1e-4


def test_greedy_chat_is_coherent(embedded):
    ids = _chat_ids(embedded)
    out = embedded.generate(ids, max_new_tokens=16, do_sample=False, verbose=False)
    answer = chat_tokenizer(embedded).decode(out[0, ids.shape[1] :])
    assert "Paris" in answer


def test_cached_generation_equals_full_recompute(embedded):
    """Fails loud if a transformers upgrade breaks the bridge's KV cache (as 5.24 did)."""
    ids = _chat_ids(embedded, "Give me three tips for staying healthy.")
    kw = dict(max_new_tokens=24, do_sample=False, verbose=False, stop_at_eos=False)
    cached = embedded.generate(ids, use_past_kv_cache=True, **kw)
    full = embedded.generate(ids, use_past_kv_cache=False, **kw)
    assert torch.equal(cached, full)


def test_no_double_bos(embedded):
    tok = chat_tokenizer(embedded)
    text = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    tokens = embedded.to_tokens(text)[0].tolist()
    assert tokens == _chat_ids(embedded)[0].tolist()
    assert tokens[0] == tok.bos_token_id and tokens[1] != tok.bos_token_id


def test_manifest_records_hashes(embedded):
    path = embedded_model_dir()
    manifest = read_manifest(path)
    assert manifest["name"] == EMBEDDED_NAME and manifest["license"] == "Apache-2.0"
    assert cache_is_valid(path, verify_hashes=True)
    info = model_info(embedded)
    assert info.sha256 == manifest["weights_sha256"] == sha256_file(path / "model.safetensors")
    assert info.display_name == "SmolLM2-135M-Instruct (Q4_1, dequantized)"


def test_killed_build_is_detected_and_rebuilt(tmp_path):
    """Kill a real build mid-way; the next call must not trust what it left."""
    env = {**os.environ, "PIGGYBACK_CACHE": str(tmp_path)}
    code = "from piggyback_interp.core.embedded import embedded_model_dir; embedded_model_dir()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".*.partial-*/*")):
        time.sleep(0.2)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    final = tmp_path / EMBEDDED_NAME
    assert not final.exists() and not cache_is_valid(final)
    assert any(tmp_path.glob(".*.partial-*"))  # the debris the next build must clean

    os.environ["PIGGYBACK_CACHE"] = str(tmp_path)
    try:
        built = embedded_model_dir()
    finally:
        del os.environ["PIGGYBACK_CACHE"]
    assert built == final and cache_is_valid(final, verify_hashes=True)
    assert not any(tmp_path.glob(".*.partial-*"))

    # a damaged file in a finished cache is detected too
    weights = final / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not cache_is_valid(final)
