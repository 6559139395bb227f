"""Judge report: how well does an evaluator agree with human labels on a file the user brings?

Three kinds of labelled data, three questions:

    pairs     preference pairs (hh-rlhf transcripts or {prompt, chosen, rejected}): does the
              evaluator prefer the answer the person chose?  Evaluator method:
                  compare_pairs(prompts, chosen, rejected) -> (n,) P(chosen better)
    refusal   answers labelled full_compliance / partial_refusal / full_refusal (XSTest's classes):
                  refusal_proba(prompts, completions) -> (n, 3) in REFUSAL_CLASSES order
    harm      answers labelled harmful true/false:
                  harm_proba(prompts, completions) -> (n,) P(harmful)

An evaluator is any object with whichever of those methods it can answer. To make one available
by name to `scripts/measure_evaluators.py`, add a lazy factory next to the built-ins at the bottom
of this file (import inside the factory: evaluators/refusal.py is imported by this module, so a
registration placed there would be a circular import):

    def _refusal_classifier(options):
        from .evaluators.refusal import RefusalClassifier
        return RefusalClassifier.load()
    register_evaluator("refusal_classifier", _refusal_classifier)

or, without touching this file, pass "package.module:factory" to --evaluators (a callable taking
EvaluatorOptions), or call `register_evaluator` from your own code before `run_report`.

The metrics are plain functions of numpy arrays (accuracy, a seeded percentile bootstrap, the
Wilson interval, confusion matrix, per-class precision/recall, expected calibration error) so they
can be checked by hand; `measure` ties them together and `render_markdown` writes the report.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..common.io import atomic_path, atomic_write_json, atomic_write_text, read_table_rows
from ..common.stats import wilson_interval
from .evaluators.refusal import REFUSAL_CLASSES, normalise_refusal_label, string_match_refusal

TASKS = ("pairs", "refusal", "harm")
HARM_CLASSES = ("not_harmful", "harmful")
# The method an evaluator needs for each task.
TASK_METHODS = {"pairs": "compare_pairs", "refusal": "refusal_proba", "harm": "harm_proba"}

_TRUE = {"1", "true", "yes", "y", "harmful", "unsafe", "t"}
_FALSE = {"0", "false", "no", "n", "harmless", "not_harmful", "safe", "f"}


# ---------------------------------------------------------------------------------------------
# Labelled data
# ---------------------------------------------------------------------------------------------
@dataclass
class LabelledSet:
    """What a report measures against. `labels`: for refusal the class index into REFUSAL_CLASSES,
    for harm 1 = harmful / 0 = not; for pairs None (the chosen answer is always the right one)."""
    task: str
    source: str
    prompts: list                       # strings, or chat messages for hh-rlhf pairs
    answers: List[str]                  # the completions; for pairs the chosen answers
    rejected: Optional[List[str]] = None
    labels: Optional[np.ndarray] = None
    split: Optional[str] = None

    def __len__(self) -> int:
        return len(self.answers)


def load_pair_set(path, split: Optional[str] = None, limit: Optional[int] = None) -> LabelledSet:
    """Preference pairs through hh_rlhf.load_pairs; `split` "train" | "heldout" | "all"/None."""
    from ..common.pairs import load_pairs

    pairs = load_pairs(path, limit=limit, split=None if split in (None, "all") else split)
    return LabelledSet("pairs", str(path), [p.prompt for p in pairs], [p.chosen for p in pairs],
                       [p.rejected for p in pairs], None, split or "all")


def _numbered_rows(path: Path) -> List[Tuple[str, dict]]:
    """(where, row) for each record of a CSV or JSONL(.gz) file; `where` is "line N" or "row N (line L)"."""
    if not path.is_file():
        raise FileNotFoundError(f"labelled file {path} does not exist")
    csv_file = path.name.removesuffix(".gz").endswith(".csv")
    rows = [(f"row {i} (line {line})" if csv_file else f"line {line}", row)
            for i, (line, row) in enumerate(read_table_rows(path), 1)]
    if not rows:
        raise ValueError(f"{path}: empty file (no labelled rows)")
    return rows


def parse_harm_label(value) -> int:
    """1 (harmful) or 0 from true/false, 1/0, yes/no, harmful/harmless, unsafe/safe."""
    if isinstance(value, bool):
        return int(value)
    key = str(value).strip().lower().replace(" ", "_")
    if key in _TRUE:
        return 1
    if key in _FALSE:
        return 0
    raise ValueError(f"unknown harm label {value!r}; expected true/false, 1/0, yes/no, harmful/harmless")


def load_answer_set(path, task: str = "refusal", prompt_column: str = "prompt",
                    completion_column: str = "completion", label_column: str = "label",
                    split: Optional[str] = None, limit: Optional[int] = None) -> LabelledSet:
    """Labelled answers from CSV or JSONL(.gz). Refusal labels are normalised to REFUSAL_CLASSES;
    harm labels parsed with `parse_harm_label`. With `split` (not "all") the file must have a
    `split` column, and only its rows equal to `split` are kept. Errors name the file and line."""
    if task not in ("refusal", "harm"):
        raise ValueError(f"task must be 'refusal' or 'harm' for labelled answers, got {task!r}")
    path = Path(path)
    rows = _numbered_rows(path)
    columns = {"prompt": prompt_column, "completion": completion_column, "label": label_column}
    if split not in (None, "all"):
        columns["split"] = "split"
    prompts, answers, labels = [], [], []
    for where, row in rows:
        for role, column in columns.items():
            if row.get(column) is None:
                hint = f" (use --{role}-column to name another)" if role != "split" else \
                    " (--split filters on a `split` column; use --split all for the whole file)"
                raise ValueError(f"{path}: {where}: missing {role} column {column!r}{hint}; "
                                 f"columns present: {sorted(row)}")
        if "split" in columns and str(row["split"]).strip() != split:
            continue
        try:
            label = REFUSAL_CLASSES.index(normalise_refusal_label(row[label_column])) if task == "refusal" \
                else parse_harm_label(row[label_column])
        except ValueError as err:
            raise ValueError(f"{path}: {where}: column {label_column!r}: {err}") from err
        prompts.append(str(row[prompt_column]))
        answers.append(str(row[completion_column]))
        labels.append(label)
        if limit is not None and len(answers) >= limit:
            break
    if not answers:
        raise ValueError(f"{path}: no rows" + (f" with split == {split!r}" if "split" in columns else ""))
    return LabelledSet(task, str(path), prompts, answers, None, np.asarray(labels, dtype=np.int64), split or "all")


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions
# ---------------------------------------------------------------------------------------------
def pairwise_correct(prob_chosen_better) -> np.ndarray:
    """1 if the evaluator prefers the chosen answer, 0.5 for a tie (exactly 0.5), else 0."""
    p = np.asarray(prob_chosen_better, dtype=np.float64)
    return np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0))


def accuracy(correct) -> float:
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def bootstrap_interval(correct, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item scores (items resampled with replacement)."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_resamples, len(correct)))  # (resamples, n)
    means = correct[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def confusion_matrix(truth, predicted, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: rows = human label, columns = predicted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return cm


def precision_recall(cm: np.ndarray, classes: Sequence[str]) -> Dict[str, dict]:
    """Per class: precision = right / predicted as it, recall = right / labelled as it (None if 0/0)."""
    out = {}
    for k, name in enumerate(classes):
        predicted, labelled = int(cm[:, k].sum()), int(cm[k, :].sum())
        out[name] = {"precision": cm[k, k] / predicted if predicted else None,
                     "recall": cm[k, k] / labelled if labelled else None, "support": labelled}
    return {name: {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in d.items()}
            for name, d in out.items()}


def calibration_bins(probs, outcomes, n_bins: int = 10) -> List[dict]:
    """Equal-width bins on [0, 1] (the last one closed): count, mean predicted, observed frequency."""
    probs, outcomes = np.asarray(probs, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    which = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": count,
                     "mean_prob": float(probs[mask].mean()) if count else None,
                     "observed": float(outcomes[mask].mean()) if count else None})
    return bins


def expected_calibration_error(probs, outcomes, n_bins: int = 10) -> float:
    """ECE = sum over bins of (share of items in the bin) * |observed frequency - mean predicted|."""
    n = len(np.asarray(probs))
    return float(sum(b["count"] / n * abs(b["observed"] - b["mean_prob"])
                     for b in calibration_bins(probs, outcomes, n_bins) if b["count"]))


def plot_reliability(probs, outcomes, path, title: str = "", xlabel: str = "predicted probability",
                     n_bins: int = 10) -> Path:
    """Reliability diagram (observed frequency per bin against the diagonal) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration_bins(probs, outcomes, n_bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / n_bins
    filled = [b for b in bins if b["count"]]
    top.bar([b["lo"] for b in filled], [b["observed"] for b in filled], width=width, align="edge",
            edgecolor="black", alpha=0.7, label="observed")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("observed frequency")
    top.set_ylim(0, 1)
    top.set_title(f"{title}  ECE {expected_calibration_error(probs, outcomes, n_bins):.3f}")
    top.legend(loc="upper left")
    bottom.bar([b["lo"] for b in bins], [b["count"] for b in bins], width=width, align="edge", edgecolor="black")
    bottom.set_xlabel(xlabel)
    bottom.set_ylabel("items")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def _is_hard(values: np.ndarray) -> bool:
    """Only 0, 0.5 and 1: a yes/no verdict, not a probability worth calibrating."""
    return bool(np.all(np.isin(np.round(values, 12), (0.0, 0.5, 1.0))))


# ---------------------------------------------------------------------------------------------
# Evaluators by name
# ---------------------------------------------------------------------------------------------
@dataclass
class EvaluatorOptions:
    """What factories may read. `framework_evaluator(name)` gives one shared, memoised framework
    evaluator ("rules", "classifier", "judge", "reward_model"), so combinations reuse its results."""
    judge_model: Optional[str] = "default"
    reward_model: Optional[str] = None
    pair_kind: Optional[str] = "harmful"   # kind passed to the framework for pairs; None = detect
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    _pool: dict = field(default_factory=dict, repr=False)

    def framework_evaluator(self, name: str):
        if name not in self._pool:
            self._pool[name] = _Memo(_load_framework_evaluator(name, self))
        return self._pool[name]


EvaluatorFactory = Callable[[EvaluatorOptions], object]
_REGISTRY: Dict[str, EvaluatorFactory] = {}


def register_evaluator(name: str, factory: EvaluatorFactory, replace: bool = False) -> None:
    """Make `factory(options) -> evaluator` available as `name` (to --evaluators)."""
    if "+" in name or "," in name:
        raise ValueError(f"evaluator name {name!r} may not contain '+' or ','")
    if name in _REGISTRY and not replace:
        raise ValueError(f"evaluator {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = factory


def available_evaluators() -> List[str]:
    return sorted(_REGISTRY)


def build_evaluator(name: str, options: Optional[EvaluatorOptions] = None):
    """A registered evaluator; "a+b+..." for the framework's weighted combination of those framework
    evaluators; or "package.module:factory", which is imported and called with `options`."""
    options = options or EvaluatorOptions()
    if "+" in name:
        parts = [p.strip() for p in name.split("+")]
        unknown = [p for p in parts if p not in FRAMEWORK_EVALUATORS]
        if unknown:
            raise ValueError(f"{name!r}: only framework evaluators combine with '+' "
                             f"({', '.join(FRAMEWORK_EVALUATORS)}); not {unknown}")
        return FrameworkEvaluator(parts, options)
    if name not in _REGISTRY and ":" in name:  # "package.module:factory", imported on demand
        import importlib

        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)(options)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"evaluator {name!r}: cannot load {attr!r} from {module!r} ({err})") from err
    if name not in _REGISTRY:
        raise ValueError(f"unknown evaluator {name!r}; registered: {', '.join(available_evaluators())} "
                         "(or give package.module:factory)")
    return _REGISTRY[name](options)


class StringMatchEvaluator:
    """The XSTest paper's string match: full_refusal if the answer opens with a refusal phrase."""

    probabilistic = False

    def refusal_proba(self, prompts, completions) -> np.ndarray:
        out = np.zeros((len(completions), len(REFUSAL_CLASSES)))
        refused = np.array([string_match_refusal(c) for c in completions], dtype=bool)
        out[refused, REFUSAL_CLASSES.index("full_refusal")] = 1.0
        out[~refused, REFUSAL_CLASSES.index("full_compliance")] = 1.0
        return out


FRAMEWORK_EVALUATORS = ("rules", "classifier", "harm_judge", "judge", "reward_model")


def _load_framework_evaluator(name: str, options: EvaluatorOptions):
    if name == "rules":
        from .evaluators.rules import RuleEvaluator
        return RuleEvaluator()
    if name == "classifier":
        from .evaluators.classifier import ClassifierEvaluator
        return ClassifierEvaluator.load(options.extra.get("classifier"))
    if name == "harm_judge":
        from .evaluators.harm_judge import HarmJudge
        return HarmJudge.load(options.extra.get("harm_judge"), device=options.device)
    if name == "judge":
        from src.models import load_causal_lm
        from .evaluators.judge import JudgeEvaluator
        model, tokenizer = load_causal_lm(options.judge_model or "default", device=options.device)
        return JudgeEvaluator(model, tokenizer)
    if name == "reward_model":
        if not options.reward_model:
            raise ValueError("the reward_model evaluator needs a trained reward model (--reward-model DIR)")
        from .evaluators.reward_model import RewardModelEvaluator
        return RewardModelEvaluator.load(options.reward_model, device=options.device)
    raise ValueError(f"no framework evaluator {name!r}")


class _Memo:
    """Wraps a framework Evaluator and keeps every comparison and score it has made, so a
    combination (a framework over several of them) reuses them instead of recomputing."""

    def __init__(self, inner):
        self.inner, self.name, self.weight = inner, inner.name, inner.weight
        self._cache: dict = {}

    @staticmethod
    def _key(prompt) -> str:
        return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)

    def _cached(self, kind, keys, principles, compute):
        todo = [i for i, key in enumerate(keys) if any((kind, key, p.name) not in self._cache for p in principles)]
        if todo:
            for i, row in zip(todo, compute(todo)):
                for p, value in zip(principles, row):
                    self._cache[(kind, keys[i], p.name)] = value
        return [[self._cache[(kind, key, p.name)] for p in principles] for key in keys]

    def score_batch(self, prompts, responses, principles, kinds=None):
        kinds = list(kinds) if kinds is not None else [None] * len(prompts)
        keys = [(self._key(p), r, k) for p, r, k in zip(prompts, responses, kinds)]
        return self._cached("score", keys, principles, lambda todo: self.inner.score_batch(
            [prompts[i] for i in todo], [responses[i] for i in todo], principles, [kinds[i] for i in todo]))

    def compare_batch(self, prompts, responses_a, responses_b, principles, kinds=None):
        kinds = list(kinds) if kinds is not None else [None] * len(prompts)
        keys = [(self._key(p), a, b, k) for p, a, b, k in zip(prompts, responses_a, responses_b, kinds)]
        return self._cached("compare", keys, principles, lambda todo: self.inner.compare_batch(
            [prompts[i] for i in todo], [responses_a[i] for i in todo], [responses_b[i] for i in todo],
            principles, [kinds[i] for i in todo]))


class FrameworkEvaluator:
    """ConstitutionalFramework restricted to `names` (with their default weights).

    compare_pairs: `compare_batch` (all principles, or `principle`); refusal_proba: the framework's
    refusal class as one-hot (the rules' regexes, or the learned classifier when `refusal_classifier`
    is given); harm_proba: 1 - the lowest applicable
    harm-principle score (0 when the answer refuses), which is above 0.5 exactly when
    `EvaluationResult.harmful` is set.
    """

    def __init__(self, names: Sequence[str], options: EvaluatorOptions, principle: Optional[str] = None,
                 refusal_classifier=None):
        from .framework import ConstitutionalFramework

        self.names, self.options, self.principle = list(names), options, principle
        evaluators = {n: options.framework_evaluator(n) for n in self.names}
        self.framework = ConstitutionalFramework(evaluators=evaluators, refusal_classifier=refusal_classifier)
        if "rules" not in self.names:
            self.framework.evaluators.pop("rules")  # the framework always adds the rules; measure without

    def compare_pairs(self, prompts, chosen, rejected) -> np.ndarray:
        comparisons = self.framework.compare_batch(prompts, chosen, rejected, principle=self.principle,
                                                   kinds=self.options.pair_kind)
        return np.asarray([c.prob_a_better for c in comparisons], dtype=np.float64)

    def refusal_proba(self, prompts, completions) -> np.ndarray:
        out = np.zeros((len(completions), len(REFUSAL_CLASSES)))
        for i, c in enumerate(self.framework.refusal_classes(prompts, completions)):
            out[i, REFUSAL_CLASSES.index(c)] = 1.0
        return out

    def harm_proba(self, prompts, completions) -> np.ndarray:
        harm = [p.name for p in self.framework.principles if p.category == "harm"]
        out = []
        for result in self.framework.evaluate_batch(prompts, completions):
            scores = [result.scores[n].score for n in harm if result.scores[n].applicable]
            out.append(0.0 if result.refused or not scores else 1.0 - min(scores))
        return np.asarray(out, dtype=np.float64)


class _Only:
    """Exposes only `methods` of `inner`: what that evaluator's verdict is measured on."""

    def __init__(self, inner, *methods):
        for method in methods:
            setattr(self, method, getattr(inner, method))
        if hasattr(inner, "probabilistic"):
            self.probabilistic = inner.probabilistic


# Built-ins. Add more here, each importing what it needs inside its factory.
register_evaluator("string_match", lambda options: StringMatchEvaluator())
register_evaluator("rules", lambda options: FrameworkEvaluator(["rules"], options))
register_evaluator("classifier", lambda options: _Only(FrameworkEvaluator(["classifier"], options), "compare_pairs"))
# A small chat model on CPU is slow: on pairs it is asked about the general `harmless` principle only.
register_evaluator("judge", lambda options: _Only(FrameworkEvaluator(["judge"], options, principle="harmless"),
                                                  "compare_pairs", "harm_proba"))
register_evaluator("reward_model", lambda options: _Only(FrameworkEvaluator(["reward_model"], options),
                                                         "compare_pairs"))
# The learned judges (data/judges/, scripts/train_judges.py), calibrated, read directly.
def _harm_judge(options):
    judge = options.framework_evaluator("harm_judge").inner
    only = _Only(judge, "compare_pairs", "harm_proba")
    only.harm_threshold = judge.harm_threshold  # it flags an answer at P(harmful) >= this
    return only


register_evaluator("harm_judge", _harm_judge)


def _refusal_classifier(options):
    from .evaluators.refusal import RefusalClassifier
    return RefusalClassifier.load(options.extra.get("refusal_classifier"))


class _RefusalProba:
    def __init__(self, classifier):
        self.classifier = classifier

    def refusal_proba(self, prompts, completions) -> np.ndarray:
        return self.classifier.predict_proba(prompts, completions)


register_evaluator("refusal_classifier", lambda options: _RefusalProba(_refusal_classifier(options)))
# The pipeline's default framework (PipelineConfig.evaluators and refusal_classifier).
register_evaluator("framework", lambda options: FrameworkEvaluator(["rules", "harm_judge"], options,
                                                                   refusal_classifier=_refusal_classifier(options)))


# ---------------------------------------------------------------------------------------------
# Measuring and reporting
# ---------------------------------------------------------------------------------------------
def _binary_summary(truth, predicted, n_resamples, seed) -> dict:
    correct = (np.asarray(truth) == np.asarray(predicted)).astype(np.float64)
    return {"accuracy": accuracy(correct), "ci95": bootstrap_interval(correct, n_resamples, seed),
            "confusion": confusion_matrix(truth, predicted, 2).tolist()}


def measure(evaluator, name: str, data: LabelledSet, n_resamples: int = 2000, seed: int = 0,
            n_bins: int = 10) -> dict:
    """Run one evaluator on `data` and compute every metric for its task (a JSON-ready dict; the
    per-item probabilities are kept under "probabilities", calibration inputs under "_calibration")."""
    method = TASK_METHODS[data.task]
    start = time.time()
    if data.task == "pairs":
        probs = np.asarray(getattr(evaluator, method)(data.prompts, data.answers, data.rejected), dtype=np.float64)
    else:
        probs = np.asarray(getattr(evaluator, method)(data.prompts, data.answers), dtype=np.float64)
    seconds = time.time() - start
    expected = (len(data), len(REFUSAL_CLASSES)) if data.task == "refusal" else (len(data),)
    if probs.shape != expected:
        raise ValueError(f"evaluator {name!r}: {method} returned shape {probs.shape}, expected {expected}")
    out = {"evaluator": name, "task": data.task, "n": len(data), "seconds": round(seconds, 2)}
    if data.task == "pairs":
        correct = pairwise_correct(probs)
        out["ties"] = int(np.sum(probs == 0.5))
        confidence, outcome, xlabel = np.maximum(probs, 1 - probs), correct, "confidence: max(P(chosen better), 1 - it)"
    elif data.task == "refusal":
        predicted = probs.argmax(axis=1)
        correct = (predicted == data.labels).astype(np.float64)
        cm = confusion_matrix(data.labels, predicted, len(REFUSAL_CLASSES))
        full = REFUSAL_CLASSES.index("full_refusal")
        compliance = REFUSAL_CLASSES.index("full_compliance")
        out.update(classes=list(REFUSAL_CLASSES), confusion=cm.tolist(),
                   per_class=precision_recall(cm, REFUSAL_CLASSES),
                   binary={"full_refusal_vs_rest": _binary_summary(data.labels == full, predicted == full,
                                                                   n_resamples, seed),
                           "any_refusal_vs_compliance": _binary_summary(data.labels != compliance,
                                                                        predicted != compliance, n_resamples, seed)})
        confidence, outcome, xlabel = probs[np.arange(len(probs)), predicted], correct, "P(predicted class)"
    else:
        # An evaluator may decide at its own threshold (chosen on validation data), P(harmful) >= t.
        threshold = getattr(evaluator, "harm_threshold", None)
        predicted = (probs >= threshold if threshold is not None else probs > 0.5).astype(np.int64)
        correct = (predicted == data.labels).astype(np.float64)
        cm = confusion_matrix(data.labels, predicted, 2)
        if threshold is not None:
            out["harm_threshold"] = float(threshold)
        # harmful answers are usually the minority: the mean of the two recalls does not reward "never"
        recalls = [cm[k, k] / cm[k].sum() for k in range(2) if cm[k].sum()]
        out["balanced_accuracy"] = float(np.mean(recalls))
        out.update(classes=list(HARM_CLASSES), confusion=cm.tolist(), per_class=precision_recall(cm, HARM_CLASSES))
        confidence, outcome, xlabel = probs, data.labels.astype(np.float64), "P(harmful)"
    out["accuracy"] = accuracy(correct)
    out["ci95"] = bootstrap_interval(correct, n_resamples, seed)
    out["wilson95"] = wilson_interval(float(correct.sum()), len(correct))
    probabilistic = getattr(evaluator, "probabilistic", None)
    if probabilistic is None:
        probabilistic = not _is_hard(probs)
    out["ece"] = expected_calibration_error(confidence, outcome, n_bins) if probabilistic else None
    if probabilistic:
        out["calibration_bins"] = calibration_bins(confidence, outcome, n_bins)
        out["_calibration"] = (confidence, outcome, xlabel)
    out["probabilities"] = probs.tolist()
    return out


def run_report(data: LabelledSet, names: Sequence[str], options: Optional[EvaluatorOptions] = None,
               n_resamples: int = 2000, seed: int = 0, n_bins: int = 10, log=print) -> dict:
    """Measure each named evaluator on `data`. For refusal files the string-match baseline is
    always measured first. Evaluators that cannot judge this task are listed under "skipped"."""
    options = options or EvaluatorOptions()
    names = list(dict.fromkeys(names))
    if data.task == "refusal" and "string_match" not in names:
        names.insert(0, "string_match")
    results, skipped = [], {}
    for name in names:
        evaluator = build_evaluator(name, options)
        if not hasattr(evaluator, TASK_METHODS[data.task]):
            skipped[name] = f"has no {TASK_METHODS[data.task]} (cannot judge {data.task})"
            log(f"{name}: skipped, {skipped[name]}")
            continue
        result = measure(evaluator, name, data, n_resamples, seed, n_bins)
        log(f"{name}: accuracy {result['accuracy']:.3f} on {result['n']} ({result['seconds']:.0f}s)")
        results.append(result)
    if not results:
        raise ValueError(f"none of the evaluators {names} can judge {data.task}: {skipped}")
    return {"task": data.task, "source": data.source, "split": data.split, "n": len(data),
            "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95}, "ece_bins": n_bins,
            "results": results, "skipped": skipped}


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def confusion_markdown(cm, classes: Sequence[str]) -> str:
    """Rows = human label, columns = predicted."""
    lines = ["| human \\ predicted | " + " | ".join(classes) + " | total |",
             "|---|" + "---|" * (len(classes) + 1)]
    for name, row in zip(classes, cm):
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + f" | {int(sum(row))} |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    task, results = report["task"], report["results"]
    what = {"pairs": "pairwise accuracy (tie = 0.5)", "refusal": "3-class refusal accuracy",
            "harm": "harmful / not accuracy"}[task]
    out = [f"# Judge report: {report['source']} (split {report['split']}, {report['n']} items, {task})", "",
           f"Accuracy = {what}; 95% CI = percentile bootstrap over items ({report['bootstrap']['resamples']} "
           f"resamples, seed {report['bootstrap']['seed']}); Wilson = score interval; ECE = expected calibration "
           f"error over {report['ece_bins']} equal-width bins (only for evaluators that give probabilities).", ""]
    header = "| evaluator | n | accuracy | 95% CI | Wilson 95% | ECE |"
    sep = "|---|---|---|---|---|---|"
    if task == "pairs":
        header, sep = header + " ties |", sep + "---|"
    if task == "refusal":
        header, sep = header + " refused? (full_refusal vs rest) | any refusal vs compliance |", sep + "---|---|"
    if task == "harm":
        header, sep = header + " balanced accuracy (mean of the two recalls) | flags at |", sep + "---|---|"
    out += [header, sep]
    for r in results:
        ece = f"{r['ece']:.3f}" if r["ece"] is not None else "-"
        row = (f"| {r['evaluator']} | {r['n']} | {r['accuracy']:.3f} | {_interval(r['ci95'])} | "
               f"{_interval(r['wilson95'])} | {ece} |")
        if task == "pairs":
            row += f" {r['ties']} |"
        if task == "harm":
            row += f" {r['balanced_accuracy']:.3f} | {r.get('harm_threshold', 0.5):.3f} |"
        if task == "refusal":
            b = r["binary"]
            row += "".join(f" {b[k]['accuracy']:.3f} {_interval(b[k]['ci95'])} |"
                           for k in ("full_refusal_vs_rest", "any_refusal_vs_compliance"))
        out.append(row)
    for r in results:
        if "confusion" not in r:
            continue
        out += ["", f"## {r['evaluator']}: confusion matrix (rows = human label, columns = predicted)", "",
                confusion_markdown(r["confusion"], r["classes"]), "",
                "| class | precision | recall | support |", "|---|---|---|---|"]
        for name, pr in r["per_class"].items():
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
            out.append(f"| {name} | {fmt(pr['precision'])} | {fmt(pr['recall'])} | {pr['support']} |")
    if report["skipped"]:
        out += ["", "Skipped: " + "; ".join(f"{k} {v}" for k, v in report["skipped"].items())]
    return "\n".join(out) + "\n"


def write_report(report: dict, output_dir) -> List[Path]:
    """report.json, report.md and reliability_<evaluator>.png per calibrated evaluator, written atomically."""
    output_dir = Path(output_dir)
    written = []
    for r in report["results"]:
        if "_calibration" in r:
            confidence, outcome, xlabel = r["_calibration"]
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in r["evaluator"])
            path = plot_reliability(confidence, outcome, output_dir / f"reliability_{safe}.png",
                                    title=f"{r['evaluator']} ({report['task']})", xlabel=xlabel,
                                    n_bins=report["ece_bins"])
            r["reliability_png"] = path.name
            written.append(path)
    clean = dict(report, results=[{k: v for k, v in r.items() if not k.startswith("_")} for r in report["results"]])
    written.append(atomic_write_json(output_dir / "report.json", clean))
    written.append(atomic_write_text(output_dir / "report.md", render_markdown(report)))
    return written
