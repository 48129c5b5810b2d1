"""piggyback-interp: find, patch and fix the chat-template tokens that carry finetuned behaviour.

The toolkit for arXiv 2606.06667 ("The Piggyback Hypothesis of Generalization"), on
TransformerLens 4's ``TransformerBridge``. Importing it has no side effects and is
fast: each public name is imported from its module on first use (PEP 562), so
``piggyback --help`` does not wait for TransformerLens.

Example:
    >>> from piggyback_interp import load_model, chat_spans
    >>> model = load_model()                       # the embedded SmolLM2-135M-Instruct
    >>> spans = chat_spans(model.tokenizer, "Can my landlord keep my deposit?")
    >>> spans.prefix, spans.query, spans.postfix   # token positions of each segment
    (range(0, 24), range(24, 31), range(31, 37))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "ChatDataError",
            "ChatDataset",
            "ChatExample",
            "load_chat_jsonl",
            "save_chat_jsonl",
            "train_test_split",
        ],
        "piggyback_interp.core.data",
    ),
    **dict.fromkeys(
        ["EMBEDDED_NAME", "EmbeddedModelError", "embedded_model_dir"],
        "piggyback_interp.core.embedded",
    ),
    **dict.fromkeys(
        ["ModelInfo", "ModelLoadError", "chat_tokenizer", "load_model", "model_info"],
        "piggyback_interp.core.models",
    ),
    **dict.fromkeys(
        ["BaseReleasedError", "IncompatiblePairError", "ModelPair", "load_pair"],
        "piggyback_interp.core.pairs",
    ),
    "Placement": "piggyback_interp.core.placement",
    **dict.fromkeys(
        [
            "SEGMENTS",
            "ChatBatch",
            "ChatSpans",
            "Segment",
            "batch_spans",
            "chat_spans",
            "empty_query_spans",
            "require_segment",
        ],
        "piggyback_interp.core.spans",
    ),
    **dict.fromkeys(
        ["Activations", "capture", "patch_activations", "patch_prefix"],
        "piggyback_interp.interventions",
    ),
    "SweepResult": "piggyback_interp.analysis.sweep_result",
    "reference_sweep": "piggyback_interp.analysis.reference",
    "sweep": "piggyback_interp.analysis.sweep",
    "kv_layer_sweep": "piggyback_interp.analysis.kv_sweep",
    **dict.fromkeys(
        ["SETTINGS", "NarrowSetting", "SettingData", "dataset_setting", "setting_data"],
        "piggyback_interp.measures.settings",
    ),
    **dict.fromkeys(
        ["Evaluation", "bootstrap_rate", "em_f1", "evaluate", "summarize"],
        "piggyback_interp.measures.evaluation",
    ),
    **dict.fromkeys(
        ["FinetuneConfig", "FinetuneResult", "KVRegulariser", "finetune", "kv_reference"],
        "piggyback_interp.training",
    ),
    **dict.fromkeys(["head_sweep", "kv_head_sweep"], "piggyback_interp.analysis.heads"),
    **dict.fromkeys(
        ["Generations", "PatchSpec", "generate"], "piggyback_interp.interventions.generation"
    ),
    **dict.fromkeys(
        [
            "LogOdds",
            "LogitMetric",
            "NextTokenKL",
            "TargetLogProb",
            "metric_on_model",
            "recovery_fraction",
        ],
        "piggyback_interp.measures.metrics",
    ),
    **dict.fromkeys(
        [
            "AnswerLength",
            "FinancialRisk",
            "ShortAnswer",
            "TargetString",
            "TextMetric",
            "ToolCall",
        ],
        "piggyback_interp.measures.detectors",
    ),
    **dict.fromkeys(
        [
            "Perturbation",
            "aggregate_trials",
            "perturb_segment",
            "perturb_segments",
        ],
        "piggyback_interp.interventions.perturb",
    ),
    "nearest_neighbours": "piggyback_interp.interventions.neighbours",
    **dict.fromkeys(
        ["ablation", "compare_controls", "control_positions", "noise_like"],
        "piggyback_interp.interventions.controls",
    ),
    **dict.fromkeys(
        ["attention_shift", "compare_template_attention", "template_attention"],
        "piggyback_interp.analysis.attention",
    ),
    **dict.fromkeys(
        ["AttentionView", "attention_view", "save_attention_view"],
        "piggyback_interp.analysis.attention_view",
    ),
    **dict.fromkeys(
        [
            "layer_recovery_curve",
            "method_comparison",
            "patching_heatmap",
            "save_figure",
            "segment_bars",
            "task_vector_heatmap",
            "training_curves",
        ],
        "piggyback_interp.report.figures",
    ),
    **dict.fromkeys(
        [
            "TaskVector",
            "apply_task_vector",
            "cosine_similarity",
            "scaled_task_vector",
            "task_vector",
        ],
        "piggyback_interp.analysis.task_vectors",
    ),
    **dict.fromkeys(
        ["ALIGNMENT_PROMPT", "COHERENCE_PROMPT", "FINANCIAL_RISK_PROMPT", "JudgePrompt"],
        "piggyback_interp.measures.judges.prompts",
    ),
    **dict.fromkeys(
        ["JudgeScore", "parse_chat_completion", "score_top_logprobs"],
        "piggyback_interp.measures.judges.scoring",
    ),
    "JudgeCache": "piggyback_interp.measures.judges.cache",
    **dict.fromkeys(["JudgeError", "OpenAIJudge"], "piggyback_interp.measures.judges.client"),
    "LocalJudge": "piggyback_interp.measures.judges.local",
    **dict.fromkeys(
        ["ChatCompletionsServer", "serve_chat_completions"],
        "piggyback_interp.measures.judges.server",
    ),
    "ScanConfig": "piggyback_interp.experiments.scan_config",
    **dict.fromkeys(["ScanResult", "find_carriers"], "piggyback_interp.experiments.scan"),
    **dict.fromkeys(["Verdict", "carrier_verdict"], "piggyback_interp.experiments.verdict"),
    "Report": "piggyback_interp.report.html",
    "Section": "piggyback_interp.report.sections",
    **dict.fromkeys(["DemoConfig", "run_demo"], "piggyback_interp.experiments.demo"),
    **dict.fromkeys(["RunDir", "load_config"], "piggyback_interp.core.runs"),
    "build_report": "piggyback_interp.report.findings",
    "load_prompts": "piggyback_interp.core.data.questions",
    "carrier_bars": "piggyback_interp.report.figures",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'piggyback_interp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from piggyback_interp.analysis.attention import (
        attention_shift,
        compare_template_attention,
        template_attention,
    )
    from piggyback_interp.analysis.attention_view import (
        AttentionView,
        attention_view,
        save_attention_view,
    )
    from piggyback_interp.analysis.heads import head_sweep, kv_head_sweep
    from piggyback_interp.analysis.kv_sweep import kv_layer_sweep
    from piggyback_interp.analysis.reference import reference_sweep
    from piggyback_interp.analysis.sweep import sweep
    from piggyback_interp.analysis.sweep_result import SweepResult
    from piggyback_interp.analysis.task_vectors import (
        TaskVector,
        apply_task_vector,
        cosine_similarity,
        scaled_task_vector,
        task_vector,
    )
    from piggyback_interp.core.data import (
        ChatDataError,
        ChatDataset,
        ChatExample,
        load_chat_jsonl,
        save_chat_jsonl,
        train_test_split,
    )
    from piggyback_interp.core.data.questions import load_prompts
    from piggyback_interp.core.embedded import EMBEDDED_NAME, EmbeddedModelError, embedded_model_dir
    from piggyback_interp.core.models import (
        ModelInfo,
        ModelLoadError,
        chat_tokenizer,
        load_model,
        model_info,
    )
    from piggyback_interp.core.pairs import (
        BaseReleasedError,
        IncompatiblePairError,
        ModelPair,
        load_pair,
    )
    from piggyback_interp.core.placement import Placement
    from piggyback_interp.core.runs import RunDir, load_config
    from piggyback_interp.core.spans import (
        SEGMENTS,
        ChatBatch,
        ChatSpans,
        Segment,
        batch_spans,
        chat_spans,
        empty_query_spans,
        require_segment,
    )
    from piggyback_interp.experiments.demo import DemoConfig, run_demo
    from piggyback_interp.experiments.scan import ScanResult, find_carriers
    from piggyback_interp.experiments.scan_config import ScanConfig
    from piggyback_interp.experiments.verdict import Verdict, carrier_verdict
    from piggyback_interp.interventions import Activations, capture, patch_activations, patch_prefix
    from piggyback_interp.interventions.controls import (
        ablation,
        compare_controls,
        control_positions,
        noise_like,
    )
    from piggyback_interp.interventions.generation import Generations, PatchSpec, generate
    from piggyback_interp.interventions.neighbours import nearest_neighbours
    from piggyback_interp.interventions.perturb import (
        Perturbation,
        aggregate_trials,
        perturb_segment,
        perturb_segments,
    )
    from piggyback_interp.measures.detectors import (
        AnswerLength,
        FinancialRisk,
        ShortAnswer,
        TargetString,
        TextMetric,
        ToolCall,
    )
    from piggyback_interp.measures.evaluation import (
        Evaluation,
        bootstrap_rate,
        em_f1,
        evaluate,
        summarize,
    )
    from piggyback_interp.measures.judges.cache import JudgeCache
    from piggyback_interp.measures.judges.client import JudgeError, OpenAIJudge
    from piggyback_interp.measures.judges.local import LocalJudge
    from piggyback_interp.measures.judges.prompts import (
        ALIGNMENT_PROMPT,
        COHERENCE_PROMPT,
        FINANCIAL_RISK_PROMPT,
        JudgePrompt,
    )
    from piggyback_interp.measures.judges.scoring import (
        JudgeScore,
        parse_chat_completion,
        score_top_logprobs,
    )
    from piggyback_interp.measures.judges.server import (
        ChatCompletionsServer,
        serve_chat_completions,
    )
    from piggyback_interp.measures.metrics import (
        LogitMetric,
        LogOdds,
        NextTokenKL,
        TargetLogProb,
        metric_on_model,
        recovery_fraction,
    )
    from piggyback_interp.measures.settings import (
        SETTINGS,
        NarrowSetting,
        SettingData,
        dataset_setting,
        setting_data,
    )
    from piggyback_interp.report.figures import (
        carrier_bars,
        layer_recovery_curve,
        method_comparison,
        patching_heatmap,
        save_figure,
        segment_bars,
        task_vector_heatmap,
        training_curves,
    )
    from piggyback_interp.report.findings import build_report
    from piggyback_interp.report.html import Report
    from piggyback_interp.report.sections import Section
    from piggyback_interp.training import (
        FinetuneConfig,
        FinetuneResult,
        KVRegulariser,
        finetune,
        kv_reference,
    )
