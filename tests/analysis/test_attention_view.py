"""attention_view: a circuitsvis view of one prompt, tokens tagged with their segment;
its pattern against plain Hugging Face eager attention."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from piggyback_interp.analysis import attention_view as view_module
from piggyback_interp.analysis.attention import prompt_spans
from piggyback_interp.analysis.attention_view import (
    AttentionView,
    attention_view,
    save_attention_view,
)
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.testing import tiny_hf_model, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


def test_attention_view_marks_segments(llama, tmp_path):
    pytest.importorskip("circuitsvis")
    view = attention_view(llama, "Tell me a joke.", layer=1, heads=[0, 2], response="No.")
    assert isinstance(view, AttentionView)
    (spans,) = prompt_spans(chat_tokenizer(llama), ["Tell me a joke."], ["No."])
    assert len(view.tokens) == len(spans) and view.labels == spans.labels()
    assert view.tokens[spans.query.start].startswith("⟨q⟩")
    assert view.tokens[0] == "⟨pre⟩<|im_start|>"
    assert view.tokens[spans.postfix.start].startswith("⟨post⟩")
    assert view.tokens[spans.response.start].startswith("⟨resp⟩")
    assert view.tokens[spans.response.stop] == "⟨other⟩<|im_end|>"
    assert view.pattern.shape == (2, len(spans), len(spans))
    assert torch.allclose(view.pattern.sum(-1), torch.ones(2, len(spans)), atol=1e-5)
    assert view.heads == (0, 2) and view.layer == 1

    html = view._repr_html_()  # offline HTML: circuitsvis's own repr would probe the network
    assert "CircuitsVis.render" in html and "unpkg.com" not in html
    for token in view.tokens:  # circuitsvis writes the tokens as JSON
        assert json.dumps(token) in html
    assert '"L1H0"' in html and '"L1H2"' in html
    assert "unpkg.com/circuitsvis" in view.html(inline_js=False)

    path = save_attention_view(view, tmp_path / "sub" / "view.html")
    text = path.read_text(encoding="utf-8")
    assert "<html" in text and "CircuitsVis.render" in text and json.dumps(view.tokens[0]) in text
    cdn = save_attention_view(view.rendered, tmp_path / "cdn.html", inline_js=False)
    assert "unpkg.com/circuitsvis" in cdn.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="pass the AttentionView"):
        save_attention_view("<div/>", tmp_path / "x.html")


def test_attention_view_pattern_equals_hf(llama):
    pytest.importorskip("circuitsvis")
    view = attention_view(llama, "Hi", layer=0)
    (spans,) = prompt_spans(chat_tokenizer(llama), ["Hi"])
    with torch.no_grad():
        expected = tiny_hf_model("llama")(spans.ids[None], output_attentions=True).attentions[0][0]
    assert torch.allclose(view.pattern, expected, atol=1e-6)


def test_missing_circuitsvis_says_how_to_install(llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "circuitsvis", None)
    monkeypatch.setitem(sys.modules, "circuitsvis.attention", None)
    with pytest.raises(ImportError, match="pip install 'circuitsvis"):
        attention_view(llama, "Hi", layer=0)


def test_bad_layer_and_heads(llama):
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] out of range"):
        attention_view(llama, "Hi", layer=5)
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] out of range"):
        attention_view(llama, "Hi", layer=0, heads=[4])


def test_docstring_examples_run():
    result = doctest.testmod(view_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5
