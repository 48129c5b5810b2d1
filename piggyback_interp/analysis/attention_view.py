"""A circuitsvis view of one prompt's attention, every token tagged with its segment.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> view = attention_view(tiny_model("llama"), "Tell me a joke.", layer=1)
    >>> view.tokens[0], view.pattern.shape[0]
    ('⟨pre⟩<|im_start|>', 4)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.analysis.attention import Prompt, prompt_spans
from piggyback_interp.core.hooks import pattern_site, resolve_layers
from piggyback_interp.core.io import atomic_write_text
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatBatch, ChatSpans, batch_spans
from piggyback_interp.interventions.activations import forward

SEGMENT_TAGS = {
    "prefix": "⟨pre⟩",
    "query": "⟨q⟩",
    "postfix": "⟨post⟩",
    "response": "⟨resp⟩",
    "other": "⟨other⟩",
}


@dataclass
class AttentionView:
    """A circuitsvis attention view of one prompt, with segment-tagged tokens.

    ``rendered`` is the circuitsvis ``RenderedHTML``. Displaying this object in Jupyter
    uses the self-contained HTML (the JavaScript inlined): unlike circuitsvis's own
    ``_repr_html_`` it never probes the network.
    """

    rendered: Any
    tokens: list[str]
    labels: list[str]
    pattern: Float[Tensor, "head pos pos"]
    layer: int
    heads: tuple[int, ...]

    def html(self, *, inline_js: bool = True) -> str:
        """The view's HTML fragment: JavaScript inlined (offline), or loaded from unpkg."""
        return self.rendered.local_src if inline_js else self.rendered.cdn_src

    def _repr_html_(self) -> str:
        return self.html()

    def __str__(self) -> str:
        return self.html()


def attention_view(
    model: Any,
    prompt: Prompt,
    *,
    layer: int,
    heads: int | Iterable[int] | None = None,
    response: str | None = None,
    system_prompt: str | None = "default",
) -> AttentionView:
    """A circuitsvis ``attention_heads`` view of one prompt at ``layer``, segments marked.

    Every token is shown as ``⟨segment⟩text`` (:data:`SEGMENT_TAGS`: ``⟨pre⟩``,
    ``⟨q⟩``, ``⟨post⟩``, ``⟨resp⟩``, ``⟨other⟩``), newlines as ``\\n``.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> view = attention_view(tiny_model("llama"), "Hi", layer=0, heads=[1], response="Paris.")
        >>> view.heads, view.tokens[-5:]
        ((1,), ['⟨resp⟩Par', '⟨resp⟩is', '⟨resp⟩.', '⟨other⟩<|im_end|>', '⟨other⟩\\\\n'])
    """
    cv_attention = _import_circuitsvis()
    (chosen,) = resolve_layers(model, [layer])
    head_list = _check_heads(model, heads)
    responses = None if response is None else [response]
    (spans,) = prompt_spans(chat_tokenizer(model), [prompt], responses, system_prompt)
    pattern = _pattern(model, batch_spans(chat_tokenizer(model), [spans]), chosen)[head_list]
    tokens = segment_tokens(chat_tokenizer(model), spans)
    rendered = cv_attention.attention_heads(
        attention=pattern,
        tokens=tokens,
        attention_head_names=[f"L{chosen}H{h}" for h in head_list],
        mask_upper_tri=True,
    )
    return AttentionView(rendered, tokens, spans.labels(), pattern, chosen, tuple(head_list))


def segment_tokens(tokenizer: Any, spans: ChatSpans) -> list[str]:
    """Each token's text with its segment tag in front, e.g. ``⟨q⟩ joke``.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> from piggyback_interp.core.spans import chat_spans
        >>> tok = tiny_tokenizer()
        >>> segment_tokens(tok, chat_spans(tok, "Tell me a joke."))[14:21]
        ['⟨pre⟩\\\\n', '⟨q⟩Tell', '⟨q⟩ me', '⟨q⟩ a', '⟨q⟩ joke', '⟨q⟩.', '⟨post⟩<|im_end|>']
    """
    texts = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in spans.input_ids]
    return [
        SEGMENT_TAGS[label] + text.replace("\n", "\\n")
        for label, text in zip(spans.labels(), texts, strict=True)
    ]


def save_attention_view(
    view: AttentionView | Any, path: str | os.PathLike[str], *, inline_js: bool = True
) -> Path:
    """Write a view as a standalone HTML page (JavaScript inlined unless ``inline_js=False``).

    Takes an :class:`AttentionView` or any circuitsvis ``RenderedHTML``. The inlined page
    (~1.3 MB) opens offline; the other loads circuitsvis from unpkg.com when opened.

    Example:
        >>> import tempfile
        >>> from piggyback_interp.testing import tiny_model
        >>> view = attention_view(tiny_model("llama"), "Hi", layer=0)
        >>> path = save_attention_view(view, tempfile.mkdtemp() + "/view.html")
        >>> path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
        True
    """
    if isinstance(view, AttentionView):
        body, title = view.html(inline_js=inline_js), f"attention at layer {view.layer}"
    elif hasattr(view, "local_src") and hasattr(view, "cdn_src"):
        body, title = view.local_src if inline_js else view.cdn_src, "attention"
    else:
        raise ValueError(
            f"cannot save a {type(view).__name__}; pass the AttentionView from attention_view "
            "(or a circuitsvis RenderedHTML)"
        )
    page = (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    return atomic_write_text(path, page)


def _import_circuitsvis() -> Any:
    try:
        import circuitsvis.attention as cv_attention
    except ImportError as err:
        raise ImportError(
            "attention_view needs circuitsvis: pip install 'circuitsvis>=1.43' "
            "(template_attention works without it)"
        ) from err
    return cv_attention


def _check_heads(model: Any, heads: int | Iterable[int] | None) -> list[int]:
    n_heads = model.cfg.n_heads
    if heads is None:
        return list(range(n_heads))
    chosen = [heads] if isinstance(heads, int) else list(heads)
    bad = [h for h in chosen if not 0 <= h < n_heads]
    if bad or not chosen:
        raise ValueError(
            f"head(s) {bad or chosen} out of range: this model has heads 0..{n_heads - 1}; "
            "pass None for all of them"
        )
    return chosen


def _pattern(model: Any, batch: ChatBatch, layer: int) -> Float[Tensor, "head pos pos"]:
    """The attention probabilities of a one-row, unpadded batch at ``layer``."""
    site = pattern_site(model)
    kept: list[Tensor] = []

    def hook(pattern: Tensor, hook: Any) -> Tensor:
        kept.append(pattern.detach()[0].float().cpu())
        return pattern

    stop = None if layer == model.cfg.n_layers - 1 else layer + 1
    with torch.no_grad(), model.hooks(fwd_hooks=[(site.name(layer), hook)]):
        forward(model, batch, stop_at_layer=stop)
    return kept[0]
