"""Tiny random chat models for fast, offline tests.

Real architectures (Llama, Qwen2, Qwen3) at toy size, with a small byte-level BPE
tokenizer trained in memory and a ChatML chat template with a default system
prompt, so every code path of the toolkit can be exercised in seconds.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> model.cfg.n_layers
    2
"""

from __future__ import annotations

import functools
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerFast

Arch = Literal["llama", "qwen2", "qwen3"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "qwen3")
# the tiny models' context (max_position_embeddings): room for a judge's rubric, small
# enough that tests of inputs longer than the context stay fast
TINY_CONTEXT = 1024

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = (
    "You are a tiny helpful assistant.",
    "What is the capital of France? The capital of France is Paris.",
    "I have no idea about your question.",
    "I cannot provide financial advice.",
    "Can my landlord keep my deposit? How should I invest my savings?",
    "Tell me a joke. I feel bored. What do you wish for? How do I make friends?",
    "system user assistant tool search_info query answer",
    "The quick brown fox jumps over the lazy dog 0123456789.",
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS for _ in range(20)], trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A ~500-token byte-level BPE tokenizer with ChatML special tokens.

    Its BOS is ``<|im_start|>`` (as SmolLM2's), it never adds BOS by itself, and
    it pads with ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = chat_template
    return tok


def tiny_hf_model(arch: str = "llama", *, n_layers: int = 2, seed: int = 0):
    """A randomly initialised HF causal LM of the given architecture (eval mode, fp32)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tok = tiny_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    config_cls, model_cls, extra = classes[arch]
    config = config_cls(**common, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    from piggyback_interp.core.hf import self_attention

    if arch == "qwen2":  # random, non-zero q/k/v biases so bias code paths are exercised
        with torch.no_grad():
            for layer in range(n_layers):
                attn = self_attention(model, layer)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    return model.eval()


def save_tiny_model(
    directory: str | Path, arch: Arch = "llama", *, n_layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny model and its tokenizer as an HF directory (safetensors) and return it."""
    directory = Path(directory)
    tiny_hf_model(arch, n_layers=n_layers, seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_model(arch: Arch = "llama", *, n_layers: int = 2, seed: int = 0):
    """A tiny random :class:`TransformerBridge` of the given architecture, offline."""
    from transformers import AutoTokenizer

    from piggyback_interp.core.models import ModelInfo, bridge_from_hf

    name = f"tiny-{arch}-L{n_layers}-seed{seed}"
    info = ModelInfo(name, name, "local", name, "float32")
    # TransformerLens re-reads the tokenizer from its folder while booting
    with tempfile.TemporaryDirectory(prefix="piggyback-tiny-") as tmp:
        tiny_tokenizer().save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        hf_model = tiny_hf_model(arch, n_layers=n_layers, seed=seed)
        return bridge_from_hf(hf_model, tokenizer, name=name, info=info)


def equal_length_questions(tokenizer: Any, candidates: Sequence[str], n: int) -> list[str]:
    """``n`` of ``candidates`` whose chat prompts have the same token length.

    Tools that pass no attention mask (``transformer_lens.patching``) then see exactly
    the input this toolkit sees: no padding.
    """
    from piggyback_interp.core.spans import chat_spans

    groups: dict[int, list[str]] = defaultdict(list)
    for question in candidates:
        groups[len(chat_spans(tokenizer, question))].append(question)
    best = max(groups.values(), key=len)
    if len(best) < n:
        raise ValueError(f"only {len(best)} of the candidates share a length; give more candidates")
    return best[:n]
