"""The figures package: no figure changes plotly's global renderer or template; its doctest."""

import doctest
import warnings

import plotly.io as pio

import piggyback_interp.report.figures as figures_package
from piggyback_interp.report.figures import save_figure


def test_no_global_renderer_or_template_changed(all_figures, plotly_defaults, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fig in all_figures.values():
            save_figure(fig, tmp_path / "x", png=False)
            assert fig.layout.template.layout.paper_bgcolor is not None  # each figure's own
    assert (pio.renderers.default, pio.templates.default) == plotly_defaults


def test_doctests():
    result = doctest.testmod(figures_package, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
