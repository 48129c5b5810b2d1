"""generate() against a slow, obviously-correct oracle: unbatched, no cache, full recompute."""

import json

import pytest
import torch

from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.interventions import capture, patch_prefix
from piggyback_interp.interventions.generation import Generations, PatchSpec, generate
from piggyback_interp.testing import tiny_model

PROMPTS = [
    "Hi",
    "Can my landlord keep my deposit? How should I invest my savings?",
    "Tell me a joke.",
    [{"role": "user", "content": "What is the capital of France?"}],
]
N_NEW = 10


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    """(base, finetuned): two tiny models of one architecture, 3 layers."""
    return tiny_model(request.param, n_layers=3, seed=0), tiny_model(
        request.param, n_layers=3, seed=1
    )


@pytest.fixture(scope="module")
def llama_pair():
    return tiny_model("llama", n_layers=3, seed=0), tiny_model("llama", n_layers=3, seed=1)


def _eos(model):
    return chat_tokenizer(model).eos_token_id


@torch.no_grad()
def oracle(model, prompt, n_new=N_NEW, eos=None, system_prompt="default"):
    """Greedy: argmax of model(ids)[0, -1], recomputing the whole sequence every step."""
    ids = chat_spans(chat_tokenizer(model), prompt, system_prompt=system_prompt).ids[None]
    out = []
    for _ in range(n_new):
        token = int(model(ids)[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def patched_oracle(model, source, prompt, **patch_kwargs):
    """The oracle inside ``patch_prefix`` on this prompt: the patch applies at every recompute."""
    spans = chat_spans(chat_tokenizer(model), prompt)
    with torch.no_grad(), patch_prefix(model, source, spans, **patch_kwargs):
        return oracle(model, prompt, eos=_eos(model))


def test_greedy_unpatched_equals_oracle(pair):
    _, ft = pair
    gens = generate(ft, PROMPTS, max_new_tokens=N_NEW, batch_size=3)
    assert gens.token_ids == [oracle(ft, p, eos=_eos(ft)) for p in PROMPTS]
    tok = chat_tokenizer(ft)
    assert gens.texts == [tok.decode(ids) for ids in gens.token_ids]


@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "layer1-isolated"])
def test_prefix_kv_patch_equals_patched_oracle(pair, layers):
    base, ft = pair
    gens = generate(ft, PROMPTS, patch=PatchSpec(base, layers=layers), max_new_tokens=N_NEW)
    expected = [patched_oracle(ft, base, p, site="kv", layers=layers) for p in PROMPTS]
    assert gens.token_ids == expected
    plain = generate(ft, PROMPTS, max_new_tokens=N_NEW)
    assert gens.token_ids != plain.token_ids  # the patch changed something


def test_postfix_patch_equals_patched_oracle(pair):
    base, ft = pair
    gens = generate(ft, PROMPTS, patch=PatchSpec(base, segment="postfix"), max_new_tokens=N_NEW)
    assert gens.token_ids == [patched_oracle(ft, base, p, segment="postfix") for p in PROMPTS]
    assert gens.token_ids != generate(ft, PROMPTS, max_new_tokens=N_NEW).token_ids


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment": "query", "layers": [0, 2]},  # isolated: the other layers' clean K/V kept
        {"segment": "postfix", "site": "resid_pre", "layers": [1]},
        {"segment": [1, 2, 3], "site": "v"},  # explicit positions inside the prefix (baked)
        {"segment": "postfix", "site": "kv", "layers": [1], "heads": [0]},  # one K/V head
    ],
    ids=["query-isolated", "postfix-resid", "explicit-prefix", "postfix-head"],
)
def test_other_patches_equal_patched_oracle(llama_pair, kwargs):
    base, ft = llama_pair
    gens = generate(ft, PROMPTS, patch=PatchSpec(base, **kwargs), max_new_tokens=N_NEW)
    assert gens.token_ids == [patched_oracle(ft, base, p, **kwargs) for p in PROMPTS]


@pytest.mark.parametrize(
    "kwargs",
    [{"segment": "query", "site": "k"}, {"segment": "postfix", "site": "v"}],
    ids=["query-keys", "postfix-values"],
)
def test_keys_or_values_alone_equal_patched_oracle(pair, kwargs):
    """Keys alone (or values alone) pin the other half too, as patch_prefix does."""
    base, ft = pair
    gens = generate(ft, PROMPTS, patch=PatchSpec(base, **kwargs), max_new_tokens=N_NEW)
    assert gens.token_ids == [patched_oracle(ft, base, p, **kwargs) for p in PROMPTS]


def test_explicit_positions_after_prefix(llama_pair):
    base, ft = llama_pair
    p = len(chat_spans(chat_tokenizer(ft), "Hi").prefix)
    positions = [p, p + 1]  # the first two tokens after the prefix, in every prompt
    gens = generate(ft, PROMPTS, patch=PatchSpec(base, segment=positions), max_new_tokens=N_NEW)
    assert gens.token_ids == [patched_oracle(ft, base, q, segment=positions) for q in PROMPTS]


def test_several_patches_equal_nested_oracle(llama_pair):
    """Prefix patches first, then the others, as nested patch_prefix blocks."""
    base, ft = llama_pair
    specs = [PatchSpec(base, segment="postfix", layers=[1]), PatchSpec(base, layers=[0])]
    gens = generate(ft, PROMPTS, patch=specs, max_new_tokens=N_NEW)
    tok = chat_tokenizer(ft)
    expected = []
    for prompt in PROMPTS:
        spans = chat_spans(tok, prompt)
        with (
            torch.no_grad(),
            patch_prefix(ft, base, spans, layers=[0]),
            patch_prefix(ft, base, spans, segment="postfix", layers=[1]),
        ):
            expected.append(oracle(ft, prompt, eos=_eos(ft)))
    assert gens.token_ids == expected
    assert [d["segment"] for d in gens.config["patch"]] == ["postfix", "prefix"]


def test_nothing_patch_equals_unpatched(pair):
    _, ft = pair
    plain = generate(ft, PROMPTS, max_new_tokens=N_NEW)
    for spec in (PatchSpec(ft), PatchSpec(ft, segment="query", layers=[0])):
        assert generate(ft, PROMPTS, patch=spec, max_new_tokens=N_NEW).token_ids == plain.token_ids


def test_activations_source_equals_model_source(llama_pair):
    base, ft = llama_pair
    batch = batch_spans(chat_tokenizer(ft), PROMPTS)
    per_prompt = capture(base, batch, "prefix", site="kv")  # one row per prompt
    shared = capture(base, chat_spans(chat_tokenizer(ft), "Hi"), "prefix", site="kv")  # one row
    expected = generate(ft, PROMPTS, patch=PatchSpec(base), max_new_tokens=N_NEW).token_ids
    for acts in (per_prompt, shared):
        assert (
            generate(ft, PROMPTS, patch=PatchSpec(acts), max_new_tokens=N_NEW).token_ids == expected
        )
    p = len(chat_spans(chat_tokenizer(ft), "Hi").prefix)
    after = [p, p + 1]  # later positions: per-prompt values, cut to each batch's rows
    acts = capture(base, batch, after, site="kv")
    expected = generate(ft, PROMPTS, patch=PatchSpec(base, segment=after), max_new_tokens=N_NEW)
    patched = generate(
        ft, PROMPTS, patch=PatchSpec(acts, segment=after), max_new_tokens=N_NEW, batch_size=3
    )
    assert patched.token_ids == expected.token_ids


def test_batch_size_and_input_forms_agree(llama_pair):
    base, ft = llama_pair
    patch = PatchSpec(base, segment="postfix")
    one = generate(ft, PROMPTS, patch=patch, max_new_tokens=N_NEW, batch_size=1)
    three = generate(ft, PROMPTS, patch=patch, max_new_tokens=N_NEW, batch_size=3)
    assert one.token_ids == three.token_ids
    tok = chat_tokenizer(ft)
    for form in (
        [chat_spans(tok, p) for p in PROMPTS],
        batch_spans(tok, PROMPTS, align="left"),
        batch_spans(tok, PROMPTS, align="prefix"),
    ):
        assert generate(ft, form, patch=patch, max_new_tokens=N_NEW).token_ids == one.token_ids


def test_sampling_is_seeded_per_prompt(llama_pair):
    _, ft = llama_pair
    before = torch.random.get_rng_state()
    runs = {
        (seed, bs): generate(
            ft, PROMPTS, temperature=1.5, seed=seed, batch_size=bs, max_new_tokens=N_NEW
        )
        for seed, bs in [(0, 4), (0, 4), (0, 1), (1, 4)]
    }
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert runs[(0, 4)].token_ids == runs[(0, 1)].token_ids  # independent of batching
    assert runs[(0, 4)].token_ids != runs[(1, 4)].token_ids
    again = generate(ft, PROMPTS, temperature=1.5, seed=0, batch_size=4, max_new_tokens=N_NEW)
    assert again.token_ids == runs[(0, 4)].token_ids
    greedy = generate(ft, PROMPTS, max_new_tokens=N_NEW)
    assert runs[(0, 4)].token_ids != greedy.token_ids
    # a nucleus holding only the top token is greedy
    nucleus = generate(ft, PROMPTS, temperature=1.0, top_p=1e-6, max_new_tokens=N_NEW)
    assert nucleus.token_ids == greedy.token_ids


class _ForwardCounter:
    """Counts forwards of an HF model that start from scratch (no cache) and their lengths."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.original_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("past_key_values") is None:
            self.lengths.append(ids.shape[1])


def test_prefix_cache_computed_once_per_prefix_and_patch(llama_pair):
    base, ft = llama_pair
    tok = chat_tokenizer(ft)
    p = len(chat_spans(tok, "Hi").prefix)
    prompts = [f"Tell me a joke number {i}." for i in range(6)]
    target, source = _ForwardCounter(ft), _ForwardCounter(base)
    try:
        generate(ft, prompts, max_new_tokens=3, batch_size=2)
        assert target.lengths == [p] and source.lengths == []
        target.lengths.clear()
        generate(ft, prompts, patch=PatchSpec(base), max_new_tokens=3, batch_size=2)
        assert target.lengths == [p] and source.lengths == [p]  # 3 batches, one prefix each
        target.lengths.clear()
        # two system prompts: two prefixes, one cache each
        mixed = prompts[:3] + [
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
            for q in prompts[3:]
        ]
        generate(ft, mixed, max_new_tokens=3, batch_size=2)
        assert len(target.lengths) == 2 and target.lengths[0] == p != target.lengths[1]
    finally:
        target.handle.remove()
        source.handle.remove()


def test_different_prefixes_equal_oracle(llama_pair):
    base, ft = llama_pair
    prompts = [
        "Hi",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me a joke."},
        ],
        [{"role": "system", "content": "You answer questions."}, {"role": "user", "content": "Hi"}],
        "Tell me a joke.",
    ]
    gens = generate(ft, prompts, patch=PatchSpec(base), max_new_tokens=N_NEW, batch_size=4)
    assert gens.token_ids == [patched_oracle(ft, base, p) for p in prompts]


def test_stops_at_eos(llama_pair):
    _, ft = llama_pair
    full = generate(ft, PROMPTS[:1], max_new_tokens=N_NEW)
    assert full.finished == [False] and len(full.token_ids[0]) == N_NEW
    stop = full.token_ids[0][3]
    config = ft.original_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [saved, stop]
    try:
        cut = generate(ft, PROMPTS[:1], max_new_tokens=N_NEW)
        kept = generate(ft, PROMPTS[:1], max_new_tokens=N_NEW, stop_at_eos=False)
    finally:
        config.eos_token_id = saved
    first = full.token_ids[0].index(stop)
    assert cut.token_ids == [full.token_ids[0][:first]] and cut.finished == [True]
    assert kept.token_ids == full.token_ids


def test_generations_record(llama_pair):
    base, ft = llama_pair
    gens = generate(ft, PROMPTS, patch=PatchSpec(base, layers=range(2)), max_new_tokens=4, seed=3)
    assert isinstance(gens, Generations) and len(gens) == len(PROMPTS)
    assert all(len(ids) <= 4 for ids in gens.token_ids)
    config = json.loads(json.dumps(gens.config))  # plain data
    assert config["max_new_tokens"] == 4 and config["seed"] == 3 and config["batch_size"] == 16
    assert config["patch"] == [
        {
            "source": "tiny-llama-L3-seed0",
            "site": "kv",
            "layers": [0, 1],
            "segment": "prefix",
            "heads": None,
            "isolate": True,
        }
    ]
    frame = gens.to_frame()
    assert list(frame["query"]) == [
        "Hi",
        "Can my landlord keep my deposit? How should I invest my savings?",
        "Tell me a joke.",
        "What is the capital of France?",
    ]
    assert list(frame["text"]) == gens.texts and frame.attrs["config"] == gens.config
    assert generate(ft, PROMPTS, max_new_tokens=4).config["patch"] is None


def test_clear_errors(llama_pair):
    base, ft = llama_pair
    tok = chat_tokenizer(ft)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(ft, [])
    with pytest.raises(ValueError, match="wrap a single prompt in a list"):
        generate(ft, "Hi")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(ft, ["Hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(ft, ["Hi"], temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(ft, ["Hi"], top_p=0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(ft, ["Hi"], batch_size=0)
    with pytest.raises(ValueError, match="ends with an assistant message"):
        generate(ft, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]])
    with pytest.raises(TypeError, match="PatchSpec"):  # ours, or the type checker's
        generate(ft, ["Hi"], patch=[base])
    with pytest.raises(TypeError, match="load it first"):
        PatchSpec("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="cannot patch segment 'response'"):
        PatchSpec(base, segment="response")
    p = len(chat_spans(tok, "Hi").prefix)
    with pytest.raises(ValueError, match=r"both in the prefix .* and after it"):
        generate(ft, ["Hi"], patch=PatchSpec(base, segment=[p - 1, p]))
    two_rows = capture(base, batch_spans(tok, PROMPTS[:2]), "prefix")
    with pytest.raises(ValueError, match="Activations have 2 rows"):
        generate(ft, PROMPTS[:3], patch=PatchSpec(two_rows))
    longer = capture(base, chat_spans(tok, "Hi", system_prompt="Be brief."), "prefix")
    with pytest.raises(
        ValueError, match="Activations hold 16 positions but the prompts' prefix has 15"
    ):
        generate(ft, ["Hi"], patch=PatchSpec(longer))
    other = capture(base, chat_spans(tok, "Hi"), "prefix")
    other.token_ids = other.token_ids.clone()
    other.token_ids[0, 3] += 1
    with pytest.raises(ValueError, match="different tokens at patched positions"):
        generate(ft, ["Hi"], patch=PatchSpec(other))
    no_prefix = chat_spans(
        tok, "hi", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}<|im_end|>"
    )
    with pytest.raises(ValueError, match="no prefix before the user's text"):
        generate(ft, [no_prefix], patch=PatchSpec(base))


@pytest.mark.embedded
def test_embedded_capital_of_france(embedded):
    question = ["What is the capital of France?"]
    plain = generate(embedded, question, max_new_tokens=16)
    nothing = generate(embedded, question, patch=PatchSpec(embedded), max_new_tokens=16)
    assert "Paris" in plain.texts[0] and plain.finished == [True]
    assert nothing.token_ids == plain.token_ids
