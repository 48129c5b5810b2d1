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
        "piggyback_interp.data",
    ),
    **dict.fromkeys(
        ["EMBEDDED_NAME", "EmbeddedModelError", "embedded_model_dir"], "piggyback_interp.embedded"
    ),
    **dict.fromkeys(
        [
            "BaseReleasedError",
            "IncompatiblePairError",
            "ModelInfo",
            "ModelLoadError",
            "ModelPair",
            "Placement",
            "chat_tokenizer",
            "load_model",
            "load_pair",
            "model_info",
        ],
        "piggyback_interp.models",
    ),
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
        "piggyback_interp.spans",
    ),
    **dict.fromkeys(
        ["Activations", "capture", "patch_activations", "patch_prefix"], "piggyback_interp.patching"
    ),
    **dict.fromkeys(["SweepResult", "reference_sweep", "sweep"], "piggyback_interp.patching.sweep"),
    "kv_layer_sweep": "piggyback_interp.patching.kv_sweep",
    **dict.fromkeys(
        ["SETTINGS", "NarrowSetting", "SettingData", "dataset_setting", "setting_data"],
        "piggyback_interp.settings",
    ),
    **dict.fromkeys(
        ["Evaluation", "bootstrap_rate", "em_f1", "evaluate", "summarize"],
        "piggyback_interp.evaluation",
    ),
    **dict.fromkeys(
        ["FinetuneConfig", "FinetuneResult", "KVRegulariser", "finetune", "kv_reference"],
        "piggyback_interp.training",
    ),
    **dict.fromkeys(["head_sweep", "kv_head_sweep"], "piggyback_interp.patching.heads"),
    **dict.fromkeys(["Generations", "PatchSpec", "generate"], "piggyback_interp.generation"),
    **dict.fromkeys(
        [
            "LogOdds",
            "LogitMetric",
            "NextTokenKL",
            "TargetLogProb",
            "metric_on_model",
            "recovery_fraction",
        ],
        "piggyback_interp.metrics",
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
        "piggyback_interp.detectors",
    ),
    **dict.fromkeys(
        [
            "Perturbation",
            "aggregate_trials",
            "nearest_neighbours",
            "perturb_segment",
            "perturb_segments",
        ],
        "piggyback_interp.perturb",
    ),
    **dict.fromkeys(
        ["ablation", "compare_controls", "control_positions", "noise_like"],
        "piggyback_interp.controls",
    ),
    **dict.fromkeys(
        [
            "AttentionView",
            "attention_shift",
            "attention_view",
            "compare_template_attention",
            "save_attention_view",
            "template_attention",
        ],
        "piggyback_interp.attention",
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
        "piggyback_interp.figures",
    ),
    **dict.fromkeys(
        [
            "TaskVector",
            "apply_task_vector",
            "cosine_similarity",
            "scaled_task_vector",
            "task_vector",
        ],
        "piggyback_interp.task_vectors",
    ),
    **dict.fromkeys(
        ["ALIGNMENT_PROMPT", "COHERENCE_PROMPT", "FINANCIAL_RISK_PROMPT", "JudgePrompt"],
        "piggyback_interp.judges.prompts",
    ),
    **dict.fromkeys(
        ["JudgeScore", "parse_chat_completion", "score_top_logprobs"],
        "piggyback_interp.judges.scoring",
    ),
    "JudgeCache": "piggyback_interp.judges.cache",
    **dict.fromkeys(["JudgeError", "OpenAIJudge"], "piggyback_interp.judges.client"),
    "LocalJudge": "piggyback_interp.judges.local",
    **dict.fromkeys(
        ["ChatCompletionsServer", "serve_chat_completions"], "piggyback_interp.judges.server"
    ),
    **dict.fromkeys(
        ["ScanConfig", "ScanResult", "Verdict", "carrier_verdict", "find_carriers"],
        "piggyback_interp.scan",
    ),
    **dict.fromkeys(["Report", "Section"], "piggyback_interp.report"),
    **dict.fromkeys(["DemoConfig", "run_demo"], "piggyback_interp.demo"),
    **dict.fromkeys(["RunDir", "load_config"], "piggyback_interp.runs"),
    "build_report": "piggyback_interp.findings",
    "load_prompts": "piggyback_interp.data.questions",
    "carrier_bars": "piggyback_interp.figures",
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
    from piggyback_interp.attention import (
        AttentionView,
        attention_shift,
        attention_view,
        compare_template_attention,
        save_attention_view,
        template_attention,
    )
    from piggyback_interp.controls import ablation, compare_controls, control_positions, noise_like
    from piggyback_interp.data import (
        ChatDataError,
        ChatDataset,
        ChatExample,
        load_chat_jsonl,
        save_chat_jsonl,
        train_test_split,
    )
    from piggyback_interp.data.questions import load_prompts
    from piggyback_interp.demo import DemoConfig, run_demo
    from piggyback_interp.detectors import (
        AnswerLength,
        FinancialRisk,
        ShortAnswer,
        TargetString,
        TextMetric,
        ToolCall,
    )
    from piggyback_interp.embedded import EMBEDDED_NAME, EmbeddedModelError, embedded_model_dir
    from piggyback_interp.evaluation import Evaluation, bootstrap_rate, em_f1, evaluate, summarize
    from piggyback_interp.figures import (
        carrier_bars,
        layer_recovery_curve,
        method_comparison,
        patching_heatmap,
        save_figure,
        segment_bars,
        task_vector_heatmap,
        training_curves,
    )
    from piggyback_interp.findings import build_report
    from piggyback_interp.generation import Generations, PatchSpec, generate
    from piggyback_interp.judges.cache import JudgeCache
    from piggyback_interp.judges.client import JudgeError, OpenAIJudge
    from piggyback_interp.judges.local import LocalJudge
    from piggyback_interp.judges.prompts import (
        ALIGNMENT_PROMPT,
        COHERENCE_PROMPT,
        FINANCIAL_RISK_PROMPT,
        JudgePrompt,
    )
    from piggyback_interp.judges.scoring import (
        JudgeScore,
        parse_chat_completion,
        score_top_logprobs,
    )
    from piggyback_interp.judges.server import ChatCompletionsServer, serve_chat_completions
    from piggyback_interp.metrics import (
        LogitMetric,
        LogOdds,
        NextTokenKL,
        TargetLogProb,
        metric_on_model,
        recovery_fraction,
    )
    from piggyback_interp.models import (
        BaseReleasedError,
        IncompatiblePairError,
        ModelInfo,
        ModelLoadError,
        ModelPair,
        Placement,
        chat_tokenizer,
        load_model,
        load_pair,
        model_info,
    )
    from piggyback_interp.patching import Activations, capture, patch_activations, patch_prefix
    from piggyback_interp.patching.heads import head_sweep, kv_head_sweep
    from piggyback_interp.patching.kv_sweep import kv_layer_sweep
    from piggyback_interp.patching.sweep import SweepResult, reference_sweep, sweep
    from piggyback_interp.perturb import (
        Perturbation,
        aggregate_trials,
        nearest_neighbours,
        perturb_segment,
        perturb_segments,
    )
    from piggyback_interp.report import Report, Section
    from piggyback_interp.runs import RunDir, load_config
    from piggyback_interp.scan import (
        ScanConfig,
        ScanResult,
        Verdict,
        carrier_verdict,
        find_carriers,
    )
    from piggyback_interp.settings import (
        SETTINGS,
        NarrowSetting,
        SettingData,
        dataset_setting,
        setting_data,
    )
    from piggyback_interp.spans import (
        SEGMENTS,
        ChatBatch,
        ChatSpans,
        Segment,
        batch_spans,
        chat_spans,
        empty_query_spans,
        require_segment,
    )
    from piggyback_interp.task_vectors import (
        TaskVector,
        apply_task_vector,
        cosine_similarity,
        scaled_task_vector,
        task_vector,
    )
    from piggyback_interp.training import (
        FinetuneConfig,
        FinetuneResult,
        KVRegulariser,
        finetune,
        kv_reference,
    )
