"""Short reprs and HTML summaries (piggyback_interp.core.display): formatting and escaping."""

import doctest
import math

import piggyback_interp.core.display as display
from piggyback_interp.core.display import Summarized, format_value, html_table


def test_format_value():
    assert format_value(0.834567) == "0.835" and format_value(12345.6) == "12,300"
    assert format_value(3) == "3" and format_value(True) == "True"
    assert format_value(math.nan) == "—" and format_value(None) == "—"
    assert format_value(-math.inf) == "−∞"
    assert format_value([0, 1]) == "[0, 1]"
    assert format_value(list(range(32))) == "[0, 1, 2, …, 31] (32)"


def test_html_table_escapes_and_heads():
    table = html_table([("<|im_start|>", 0.5)], columns=["token", "recovery"])
    assert "&lt;|im_start|&gt;" in table and "<|im_start|>" not in table
    assert table.count("<th") == 2 and "<td>0.5</td>" in table


class _Many(Summarized):
    def _facts(self):
        return {"headline": "word " * 500, "layers": list(range(100)), "missing": None}


def test_summarized_is_short_and_leaves_out_none():
    text = repr(_Many())
    assert text.startswith("_Many(headline=word word") and "layers=[0, 1, 2, …, 99] (100)" in text
    assert len(text) < 250 and "missing" not in text
    assert "missing" not in _Many()._repr_html_()


def test_doctests():
    result = doctest.testmod(display, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 4
