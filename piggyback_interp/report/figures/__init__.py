"""Plotly figures of the toolkit's results; each function takes a result, returns a Figure.

No function sets a global renderer or template (each figure carries its own template).

| function | takes |
| --- | --- |
| :func:`patching_heatmap` | a :class:`~piggyback_interp.analysis.sweep_result.SweepResult` |
| :func:`layer_recovery_curve` | ``{label: SweepResult or [prompts, layers] recovery}`` or a tidy frame |
| :func:`carrier_bars` | a :func:`~piggyback_interp.experiments.scan_experiments.segment_patching` or perturbation frame |
| :func:`segment_bars` | a :func:`~piggyback_interp.interventions.perturb.trials_frame` or ``{segment: aggregate_trials(...)}`` |
| :func:`method_comparison` | a :func:`~piggyback_interp.measures.evaluation.summarize` frame with ``method`` |
| :func:`training_curves` | a :class:`~piggyback_interp.training.FinetuneResult`, history or ``finetune.json`` |
| :func:`task_vector_heatmap` | a frame with ``layer, a, b, cosine`` |
| :func:`save_figure` | any figure: standalone HTML, and PNG where kaleido 0.2.1 is installed |
| :func:`check_html_renders` | saved HTML files, opened in headless Chromium |

Example:
    >>> import torch
    >>> from piggyback_interp.report.figures import layer_recovery_curve
    >>> fig = layer_recovery_curve({"prefix": torch.tensor([[0.1, 0.9], [0.3, 0.7]])})
    >>> type(fig).__name__
    'Figure'
"""

from piggyback_interp.report.figures.carriers import carrier_bars
from piggyback_interp.report.figures.patching import layer_recovery_curve, patching_heatmap
from piggyback_interp.report.figures.render import check_html_renders, png_stats
from piggyback_interp.report.figures.results import method_comparison, segment_bars
from piggyback_interp.report.figures.save import figure_png, save_figure
from piggyback_interp.report.figures.training import task_vector_heatmap, training_curves

__all__ = [
    "carrier_bars",
    "check_html_renders",
    "figure_png",
    "layer_recovery_curve",
    "method_comparison",
    "patching_heatmap",
    "png_stats",
    "save_figure",
    "segment_bars",
    "task_vector_heatmap",
    "training_curves",
]
