"""Evaluate a model (or a patched one) on a narrow setting: the paper's Table 5 and more.

:func:`evaluate` generates answers to the held-out on-topic questions and to the
off-topic ones with the batched :func:`~piggyback_interp.interventions.generation.generate` (so a
:class:`~piggyback_interp.interventions.generation.PatchSpec` is evaluated the same way), scores
them with the setting's detector and metrics and with any judges, and keeps every
response. :meth:`Evaluation.summary` (and :func:`summarize` for several models) gives
mean +- standard error over seeds and a percentile-bootstrap interval per split and
metric; with an ``alignment`` judge it adds the misaligned fraction (score < 30) and
EM-F1.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.measures.settings import setting_data
    >>> data = setting_data("abstention")
    >>> data.test_on_topic, data.test_off_topic = data.test_on_topic[:2], data.test_off_topic[:2]
    >>> result = evaluate(tiny_model("llama"), data, max_new_tokens=4)
    >>> len(result.responses), result.rate("off_topic")  # abstention rate, off-topic
    (4, 0.0)
    >>> result.summary()[["split", "metric", "n"]].values.tolist()
    [['on_topic', 'behaviour', 2], ['off_topic', 'behaviour', 2]]
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from piggyback_interp.core.display import Summarized
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.io import atomic_write_parquet, atomic_write_text
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.provenance import versions
from piggyback_interp.measures.settings import NarrowSetting, SettingData, get_setting, setting_data

SPLITS = ("on_topic", "off_topic")


@dataclass
class RateEstimate:
    """A mean (e.g. a behaviour rate) with a bootstrap confidence interval over questions."""

    rate: float
    low: float
    high: float
    n: int
    hits: list[float] = field(repr=False, default_factory=list)


def bootstrap_rate(
    hits: Sequence[float | int], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> RateEstimate:
    """Mean of ``hits`` with a percentile bootstrap interval (seeded, no global RNG).

    Example:
        >>> est = bootstrap_rate([1, 0, 1, 1])
        >>> est.rate, est.low <= est.rate <= est.high
        (0.75, True)
    """
    if not hits:
        raise ValueError("no responses to score")
    values = torch.tensor(list(hits), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (n_boot, len(values)), generator=gen)
    means = values[idx].mean(1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(
        means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    ).tolist()
    return RateEstimate(values.mean().item(), low, high, len(values), [float(h) for h in hits])


def em_f1(in_domain: float, general: float) -> float:
    """EM-F1 = 2 (100 - ID) EM / ((100 - ID) + EM) from alignment scores in 0..100.

    High when the narrow behaviour is learned (low in-domain alignment ID) AND general
    alignment EM stays high.

    Example:
        >>> round(em_f1(13.3, 47.5), 1)  # the paper's Table 3, SFT on Llama legal
        61.4
    """
    for name, value in (("in_domain", in_domain), ("general", general)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} alignment must be in [0, 100], got {value}")
    denom = (100 - in_domain) + general
    return 0.0 if denom == 0 else 2 * (100 - in_domain) * general / denom


@dataclass(repr=False)
class Evaluation(Summarized):
    """Every response of an evaluation with its scores, and what produced them.

    ``responses`` has one row per (seed, split, question): ``response``,
    ``behaviour`` (the detector), one column per metric and judge (NaN where a judge
    gave no score), ``<judge>_label`` (score / code / refusal / unparsed). Printed, it
    shows the setting, the model and the behaviour rate per split; in Jupyter also the
    mean of every metric per split.
    """

    responses: Any  # pandas.DataFrame
    metrics: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def _facts(self) -> dict[str, Any]:
        model = self.meta.get("model")
        facts = {
            "setting": self.meta.get("setting"),
            "model": model.get("display_name") or model.get("name") if model else None,
            "patch": self.meta.get("patch"),
            "seeds": sorted(self.responses["seed"].unique().tolist()),
            "responses": len(self.responses),
        }
        if "behaviour" in self.metrics:
            for split in SPLITS:
                facts[f"{split}_rate"] = self.rate(split)
        return facts

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        means = self.responses.groupby("split", sort=False)[self.metrics].mean()
        rows = [[split, *means.loc[split].tolist()] for split in means.index]
        return ["split", *self.metrics], rows

    def summary(self, *, n_boot: int = 2000) -> Any:
        """Mean +- SE over seeds and a bootstrap interval per (split, metric)."""
        return summarize(self.responses, self.metrics, n_boot=n_boot)

    def rate(self, split: str = "off_topic", metric: str = "behaviour") -> float:
        """The mean of ``metric`` on ``split`` over every seed."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return float(self.responses.loc[self.responses["split"] == split, metric].mean())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``path`` (parquet, the responses) and ``path.json`` (metrics, meta), atomically."""
        path = atomic_write_parquet(self.responses, path)
        meta = {"metrics": self.metrics, "meta": self.meta}
        atomic_write_text(f"{path}.json", json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Evaluation:
        """Read what :meth:`save` wrote."""
        import pandas as pd

        meta = json.loads(Path(f"{path}.json").read_text("utf-8"))
        return cls(pd.read_parquet(path), meta["metrics"], meta["meta"])


def _judges(judge: Any) -> dict[str, Any]:
    if judge is None:
        return {}
    judges = dict(judge) if isinstance(judge, Mapping) else {"alignment": judge}
    for name, j in judges.items():
        if not callable(getattr(j, "score_many", None)):
            raise TypeError(
                f"judge {name!r} ({type(j).__name__}) has no score_many(questions, answers); "
                "pass an OpenAIJudge or LocalJudge from piggyback_interp.measures.judges"
            )
    return judges


def evaluate(
    model: Any,
    setting: NarrowSetting | SettingData | str,
    *,
    patch: Any = None,
    judge: Any = None,
    seeds: Sequence[int] = (0,),
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    system_prompt: str | None = "default",
    limit: int | None = None,
    progress: bool = True,
) -> Evaluation:
    """Generate on- and off-topic answers for each seed, score them, keep every response.

    ``setting``: a shipped setting's name, a :class:`NarrowSetting` (its seed-0 split)
    or a :class:`SettingData` (e.g. from :func:`~piggyback_interp.measures.settings.dataset_setting`).
    ``patch``: a :class:`~piggyback_interp.interventions.generation.PatchSpec` (or a list of them).
    ``judge``: a judge (scored as ``alignment``) or ``{name: judge}``.
    ``seeds`` are sampling seeds: they need ``temperature > 0`` (greedy answers are the
    same for every seed). ``max_new_tokens`` defaults to the setting's;
    ``limit`` keeps the first questions of each split (smoke runs). ``progress``: a
    progress bar (on stderr) of the answers generated, advanced after each batch.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from piggyback_interp.interventions.generation import generate

    seeds = _check_seeds(list(seeds), temperature)
    data = setting if isinstance(setting, SettingData) else None
    if data is None:
        data = setting_data(get_setting(setting), tokenizer=chat_tokenizer(model))
    spec = data.setting
    judges = _judges(judge)
    max_new_tokens = max_new_tokens or spec.max_new_tokens
    metrics = ["behaviour", *(m.name for m in spec.metrics), *judges]
    if "alignment" in judges:
        metrics.append("misaligned")
    start = time.perf_counter()
    frames = []
    questions_of = {split: getattr(data, f"test_{split}")[:limit] for split in SPLITS}
    total = len(seeds) * sum(len(q) for q in questions_of.values())
    bar = tqdm(total=total, disable=not progress, desc=f"evaluate {spec.name}", unit="answer")
    for seed in seeds:
        for split in SPLITS:
            questions = questions_of[split]
            texts = generate(
                model,
                questions,
                patch=patch,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                batch_size=batch_size,
                system_prompt=system_prompt,
                on_batch=bar.update,
            ).texts
            frame = pd.DataFrame({"seed": seed, "split": split, "question": questions})
            frames.append(_score(frame, texts, spec, judges))
    bar.close()
    meta = {
        **_meta(model, spec, patch, judges, seeds),
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "system_prompt": system_prompt,
        "n_questions": {s: len(q) for s, q in questions_of.items()},
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return Evaluation(pd.concat(frames, ignore_index=True), metrics, meta)


def _check_seeds(seeds: list[int], temperature: float) -> list[int]:
    """Distinct, non-empty seeds; several only when sampling."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct and non-empty, got {seeds}")
    if temperature == 0 and len(seeds) > 1:
        raise UserError(
            "greedy decoding (temperature=0) gives the same answers for every seed; "
            "pass temperature > 0 to sample, or a single seed"
        )
    return seeds


def _score(frame: Any, texts: list[str], spec: NarrowSetting, judges: dict[str, Any]) -> Any:
    """``frame`` (one row per question) with the responses, the detector, the setting's
    metrics and every judge's scores."""
    questions = frame["question"].tolist()
    frame["response"] = texts
    frame["behaviour"] = spec.detector(texts).tolist()
    for metric in spec.metrics:
        frame[metric.name] = metric(texts).tolist()
    for name, j in judges.items():
        scores = j.score_many(questions, texts)
        frame[name] = [math.nan if s.score is None else s.score for s in scores]
        frame[f"{name}_label"] = [s.label for s in scores]
        if name == "alignment":  # score < 30 (judges.MISALIGNED_BELOW)
            flags = [s.misaligned() for s in scores]
            frame["misaligned"] = [math.nan if f is None else float(f) for f in flags]
    return frame


def _meta(
    model: Any, spec: NarrowSetting, patch: Any, judges: dict[str, Any], seeds: list[int]
) -> dict[str, Any]:
    """What an evaluation ran: setting, detector, model, patch, judges, seeds."""
    return {
        "setting": spec.name,
        "detector": spec.detector.name,
        "model": model_info(model).to_dict(),
        "patch": _describe_patch(patch),
        "judges": {n: getattr(j, "judge_id", type(j).__name__) for n, j in judges.items()},
        "seeds": seeds,
    }


def _describe_patch(patch: Any) -> Any:
    if patch is None:
        return None
    specs = patch if isinstance(patch, (list, tuple)) else [patch]
    return [s.describe() if hasattr(s, "describe") else repr(s) for s in specs]


def summarize(
    responses: Any, metrics: Sequence[str], *, by: Sequence[str] = (), n_boot: int = 2000
) -> Any:
    """Per (``by``..., split, metric): ``mean`` over seeds of the per-seed means, its
    standard error ``se`` (NaN with one seed), the 95% bootstrap interval ``low`` /
    ``high`` of the pooled responses, ``n_seeds`` and ``n`` (scored responses).

    With an ``alignment`` column, a ``split="both"`` row gives EM-F1 (in-domain =
    on-topic alignment) per seed, then mean and SE over seeds.
    """
    import pandas as pd

    by = list(by)
    rows = []
    for keys, group in responses.groupby([*by, "split"], sort=False):
        keys = dict(zip([*by, "split"], keys, strict=True))  # a list grouper gives tuples
        for metric in metrics:
            values = group[metric].dropna()
            if values.empty:
                continue
            per_seed = group.groupby("seed")[metric].mean().dropna()
            est = bootstrap_rate(values.tolist(), n_boot=n_boot)
            rows.append({**keys, "metric": metric, **_over_seeds(per_seed.tolist())})
            rows[-1].update(low=est.low, high=est.high, n=len(values))
    if "alignment" in metrics:
        groups = responses.groupby(by, sort=False) if by else [((), responses)]
        for keys, group in groups:
            keys = dict(zip(by, keys, strict=True))
            means = group.groupby(["seed", "split"])["alignment"].mean().unstack()
            if set(SPLITS) <= set(means.columns):
                means = means.dropna(subset=list(SPLITS))
                scores = [em_f1(r.on_topic, r.off_topic) for r in means.itertuples()]
                if scores:
                    rows.append({**keys, "split": "both", "metric": "em_f1", **_over_seeds(scores)})
                    rows[-1].update(low=math.nan, high=math.nan, n=len(scores))
    columns = [*by, "split", "metric", "mean", "se", "low", "high", "n_seeds", "n"]
    return pd.DataFrame(rows, columns=columns)


def _over_seeds(values: Sequence[float]) -> dict[str, float | int]:
    t = torch.tensor(list(values), dtype=torch.float64)
    se = (t.std(unbiased=True) / math.sqrt(len(t))).item() if len(t) > 1 else math.nan
    return {"mean": t.mean().item(), "se": se, "n_seeds": len(t)}


def format_estimate(mean: float, se: float, low: float, high: float, digits: int = 2) -> str:
    """``"0.68 ± 0.03 [0.60, 0.75]"`` (the SE part only with several seeds).

    Example:
        >>> format_estimate(0.675, 0.031, 0.6, 0.75)
        '0.68 ± 0.03 [0.60, 0.75]'
    """
    text = f"{mean:.{digits}f}"
    if not math.isnan(se):
        text += f" ± {se:.{digits}f}"
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def markdown_table(frame: Any) -> str:
    """A pandas DataFrame as a GitHub markdown table (no extra dependency)."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Evaluation",
    "RateEstimate",
    "bootstrap_rate",
    "em_f1",
    "evaluate",
    "format_estimate",
    "markdown_table",
    "summarize",
]
