"""Standard safety benchmarks: built-in prompt sets, a loader for your own, and paired statistics.

    bench = load_benchmark("xstest")                      # or "advbench", or a CSV/JSONL path
    result = run_benchmark(model, tokenizer, bench, framework, model_name="base")
    result.write("runs/bench/xstest/base"); print(result.to_markdown())
    print(benchmarks_markdown({"xstest": {"base": before, "rl": after}}))   # table + significance line

Evaluation only: the benchmark prompts are never trained or tuned on (data/benchmarks/*/SOURCE.md);
tests/test_benchmarks.py checks that no prompt file under data/ repeats one of them.

Per answer (greedy, through `generation.generate_text`, the toolkit's one generation path):
    string_match_refusal  the XSTest paper's rule: the answer opens with a refusal phrase
                          (`evaluators.refusal.string_match_refusal`), a transparent anchor
    judge_class           full_compliance | partial_refusal | full_refusal, from a pluggable
                          `refusal_judge(prompts, answers) -> list of class names`; the default,
                          `FrameworkRefusalJudge`, is the framework's `refusal_class` (its learned
                          classifier when loaded, else the rules: full_refusal / full_compliance)
    harmful               the framework's `EvaluationResult.harmful` (a harm principle failed and
                          the answer does not decline)
Every rate (per kind, and per prompt `type` when a set has several) comes with a Wilson 95%
interval; two models answering the same prompts are compared with McNemar's exact test
(two-sided) and Newcombe's interval for a paired difference (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from ..common.io import REPO_ROOT, atomic_path, atomic_write_json, atomic_write_text, read_table_rows
from ..common.stats import Z95, wilson_interval
from ..judging.evaluators.refusal import REFUSAL_CLASSES, normalise_refusal_label, string_match_refusal
from ..training.generation import GenerationConfig, generate_text

BENCHMARK_DIR = REPO_ROOT / "data" / "benchmarks"

# The judge's interface: prompts and answers in, one of REFUSAL_CLASSES per answer out.
RefusalJudge = Callable[[Sequence[str], Sequence[str]], List[str]]

_KIND_ALIASES = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "safe": "benign"}
_PROMPT_COLUMNS = ("prompt", "goal", "behavior")           # HarmBench calls it Behavior
_KIND_COLUMNS = ("kind", "label")
_TYPE_COLUMNS = ("type", "category", "semanticcategory")


# -- the prompt sets ---------------------------------------------------------------------------

@dataclass
class Benchmark:
    """A named prompt set: one kind (harmful/benign) and one type per prompt."""

    name: str
    prompts: List[str]
    kinds: List[str]
    types: List[str]
    ids: List[str]
    source: str = ""

    def __post_init__(self):
        n = len(self.prompts)
        if not n:
            raise ValueError(f"benchmark {self.name!r} has no prompts")
        if not len(self.kinds) == len(self.types) == len(self.ids) == n:
            raise ValueError(f"benchmark {self.name!r}: prompts, kinds, types and ids differ in length")
        bad = sorted(set(self.kinds) - set(_KIND_ALIASES.values()))
        if bad:
            raise ValueError(f"benchmark {self.name!r}: kinds must be harmful or benign, got {bad}")

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, limit: Optional[int]) -> "Benchmark":
        """`limit` prompts: each kind gets its share (at least one), taken evenly spread over the
        file (every k-th row of that kind), so a quick run of XSTest, whose rows are ordered by
        type, still sees both kinds and most types. Deterministic; None: all of them."""
        n = len(self.prompts)
        if limit is None or limit >= n:
            return self
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        by_kind = {k: [i for i, kind in enumerate(self.kinds) if kind == k] for k in dict.fromkeys(self.kinds)}
        share = {k: max(1, round(limit * len(rows) / n)) for k, rows in by_kind.items()}
        while sum(share.values()) > limit:  # rounding (or the minimum of one) overshot: trim the largest
            share[max(share, key=share.get)] -= 1
        while sum(share.values()) < limit:
            share[max(by_kind, key=lambda k: len(by_kind[k]) - share[k])] += 1
        rows = sorted(r[i * len(r) // share[k]] for k, r in by_kind.items() for i in range(share[k]))
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return Benchmark(self.name, pick(self.prompts), pick(self.kinds), pick(self.types), pick(self.ids),
                         self.source)


@dataclass(frozen=True)
class BuiltinBenchmark:
    path: str                       # relative to the repository root
    prompt_column: str
    kind_column: Optional[str]      # None: every prompt has `kind`
    kind: Optional[str] = None
    type_column: Optional[str] = None
    description: str = ""


BUILTIN_BENCHMARKS: Dict[str, BuiltinBenchmark] = {
    "xstest": BuiltinBenchmark(
        "data/benchmarks/xstest/xstest_prompts.csv", "prompt", "label", type_column="type",
        description="XSTest v2 (Röttger et al. 2024): 250 safe prompts that look unsafe (over-refusal) "
                    "and 200 unsafe contrast prompts, 18 types"),
    "advbench": BuiltinBenchmark(
        "data/benchmarks/advbench/harmful_behaviors_dev.csv", "goal", None, kind="harmful",
        description="AdvBench harmful behaviours (Zou et al. 2023), the 260-row development half"),
}


def load_benchmark(name_or_path, limit: Optional[int] = None, kind: Optional[str] = None) -> Benchmark:
    """A built-in benchmark by name (`BUILTIN_BENCHMARKS`) or a CSV/JSONL prompt file (see
    `load_prompt_file`); `limit` keeps that many prompts spread over the set (`Benchmark.select`)."""
    key = str(name_or_path)
    if key in BUILTIN_BENCHMARKS:
        spec = BUILTIN_BENCHMARKS[key]
        bench = load_prompt_file(REPO_ROOT / spec.path, name=key, prompt_column=spec.prompt_column,
                                 kind_column=spec.kind_column, type_column=spec.type_column, kind=spec.kind)
        if spec.type_column is None:
            bench.types = [key] * len(bench)
    else:
        path = Path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no built-in benchmark {key!r} (built in: {', '.join(BUILTIN_BENCHMARKS)}) "
                                    f"and no prompt file at {path}")
        bench = load_prompt_file(path, kind=kind)
    return bench.select(limit)


def load_prompt_file(path, name: Optional[str] = None, prompt_column: Optional[str] = None,
                     kind_column: Optional[str] = None, type_column: Optional[str] = None,
                     kind: Optional[str] = None) -> Benchmark:
    """Prompts from a CSV (header row) or JSONL file: a prompt column (`prompt`, `goal` or
    `behavior`, any case, or `prompt_column`), a kind column (`kind` or `label`: harmful/benign,
    also unsafe/safe; or `kind` for every row of a file without one, e.g. HarmBench's
    behaviours), an optional type column (`type`, `category` or `semanticcategory`) and an
    optional `id`. A bad row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    rows = read_table_rows(path)  # [(line number, {column: value})]
    if not rows:
        raise ValueError(f"{path}: contains no prompts")
    columns = {c.lower(): c for _, row in rows[:1] for c in row}
    prompt_col = _column(path, columns, [prompt_column] if prompt_column else _PROMPT_COLUMNS, "prompt")
    kind_col = (_column(path, columns, [kind_column], "kind") if kind_column
                else next((columns[c] for c in _KIND_COLUMNS if c in columns), None))
    type_col = (_column(path, columns, [type_column], "type") if type_column
                else next((columns[c] for c in _TYPE_COLUMNS if c in columns), None))
    if kind_col is None and kind is None:
        raise ValueError(f"{path}: no kind column (looked for {', '.join(_KIND_COLUMNS)}; columns: "
                         f"{', '.join(columns.values())}); add one with harmful/benign (or unsafe/safe) per row, "
                         "or give the kind of every prompt (kind='harmful', --benchmark-kind harmful)")
    default_kind = _kind(kind, f"{path}: kind") if kind is not None else None
    prompts, kinds, types, ids = [], [], [], []
    for line, row in rows:
        text = row.get(prompt_col)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line}: empty or missing prompt in column {prompt_col!r}")
        raw_kind = row.get(kind_col) if kind_col else None
        if raw_kind is None or str(raw_kind).strip() == "":
            if default_kind is None:
                raise ValueError(f"{path}:{line}: no kind in column {kind_col!r}")
            row_kind = default_kind
        else:
            row_kind = _kind(raw_kind, f"{path}:{line}: kind")
        prompts.append(text.strip())
        kinds.append(row_kind)
        types.append(str(row.get(type_col) or row_kind) if type_col else row_kind)
        ids.append(str(row.get("id", line)))
    return Benchmark(name or path.name.split(".")[0], prompts, kinds, types, ids, str(path))


def _column(path: Path, columns: Dict[str, str], wanted: Sequence[str], what: str) -> str:
    for c in wanted:
        if c.lower() in columns:
            return columns[c.lower()]
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(wanted)}; columns: {', '.join(columns.values())})")


def _kind(value, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _KIND_ALIASES:
        raise ValueError(f"{where} {value!r} is not one of harmful, benign, unsafe, safe")
    return _KIND_ALIASES[key]


# -- near-duplicate detection (the contamination check) ----------------------------------------

def normalise_text(text: str) -> str:
    """Lower case, curly quotes straightened, apostrophes dropped, punctuation to spaces."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("'", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def word_shingles(text: str, size: int = 2) -> frozenset:
    words = normalise_text(text).split()
    if len(words) < size:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i:i + size]) for i in range(len(words) - size + 1))


NEAR_DUPLICATE_JACCARD = 0.75  # word-bigram Jaccard at or above this counts as a near-duplicate


def find_near_duplicates(texts: Sequence[str], references: Sequence[str],
                         threshold: float = NEAR_DUPLICATE_JACCARD) -> List[Tuple[int, int, float]]:
    """(index in texts, index in references, similarity) for every text that equals a reference
    after `normalise_text`, or whose word-bigram Jaccard similarity with one is >= threshold.
    0.75 catches a prompt with a word added or dropped (from 4 words up) and a one-word change at
    either end from 8 words up, and leaves apart short prompts that share only a frame
    ("How can I get away with speeding?" vs "... with rape?", 0.71)."""
    ref_norm = {normalise_text(r): j for j, r in enumerate(references)}
    ref_sets = [word_shingles(r) for r in references]
    hits = []
    for i, text in enumerate(texts):
        norm = normalise_text(text)
        if norm in ref_norm:
            hits.append((i, ref_norm[norm], 1.0))
            continue
        s = word_shingles(text)
        best, best_j = 0.0, -1
        for j, r in enumerate(ref_sets):
            small, large = sorted((len(s), len(r)))
            if small < threshold * large:  # Jaccard <= small/large: cannot reach the threshold
                continue
            sim = len(s & r) / len(s | r)
            if sim > best:
                best, best_j = sim, j
        if best >= threshold:
            hits.append((i, best_j, best))
    return hits


# -- statistics --------------------------------------------------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for the discordant counts b and c: under the null each
    discordant pair is equally likely either way, so min(b, c) ~ Binomial(b + c, 1/2);
    p = min(1, 2 * P(X <= min(b, c)))."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** m)  # exact big-integer arithmetic, one rounding at the end


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> Tuple[float, float, float]:
    """Newcombe's (1998, method 10) score interval for p2 - p1 of paired binary outcomes.

    a: both 1, b: first 1 and second 0, c: first 0 and second 1, d: both 0; p1 = (a+b)/n,
    p2 = (a+c)/n. Returns (difference, low, high). Built from the two Wilson intervals and the
    phi correlation of the pairs, so it stays inside [-1, 1] and behaves at 0% and 100%."""
    n = a + b + c + d
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0
    diff = p2 - p1
    delta = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    epsilon = math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return (diff, max(-1.0, diff - delta), min(1.0, diff + epsilon))


# -- judging answers ---------------------------------------------------------------------------

class FrameworkRefusalJudge:
    """The default refusal judge: the framework's refusal class (its learned 3-class classifier when
    loaded, else the rules' regexes as full_refusal / full_compliance). Any callable with the same
    signature (prompts, answers) -> list of REFUSAL_CLASSES plugs in instead."""

    name = "the framework's refusal class"

    def __init__(self, framework):
        self.framework = framework

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> List[str]:
        return self.classes_from_results(self.framework.evaluate_batch(prompts, answers))

    @staticmethod
    def classes_from_results(results) -> List[str]:
        return [r.refusal_class for r in results]


def judge_name(judge) -> str:
    return getattr(judge, "name", None) or getattr(judge, "__name__", None) or type(judge).__name__


def apply_refusal_judge(judge: RefusalJudge, prompts: Sequence[str], answers: Sequence[str]) -> List[str]:
    """Call the judge and check what it returns: one class per answer (aliases such as
    'refusal' or XSTest's '2_full_refusal' are normalised)."""
    classes = list(judge(list(prompts), list(answers)))
    if len(classes) != len(answers):
        raise ValueError(f"refusal judge {judge_name(judge)!r} returned {len(classes)} classes for "
                         f"{len(answers)} answers")
    return [normalise_refusal_label(c) for c in classes]


# -- one model on one benchmark ----------------------------------------------------------------

METRICS = ("string_match_refusal", "full_refusal", "partial_refusal", "full_compliance", "any_refusal", "harmful")
METRIC_LABELS = {
    ("harmful", "string_match_refusal"): "refusal (string match) ↑",
    ("harmful", "full_refusal"): "full refusal (judge) ↑",
    ("harmful", "partial_refusal"): "partial refusal (judge)",
    ("harmful", "full_compliance"): "full compliance (judge) ↓",
    ("harmful", "any_refusal"): "any refusal (judge) ↑",
    ("harmful", "harmful"): "harmful compliance ↓",
    ("benign", "string_match_refusal"): "refusal (string match) ↓",
    ("benign", "full_refusal"): "over-refusal, full (judge) ↓",
    ("benign", "partial_refusal"): "partial refusal (judge) ↓",
    ("benign", "full_compliance"): "full compliance (judge) ↑",
    ("benign", "any_refusal"): "over-refusal, any (judge) ↓",
    ("benign", "harmful"): "flagged harmful (false alarm) ↓",
}
# The rows of the cross-model table (report.md, comparison.md) and of the significance sentence.
HEADLINE = {"harmful": ("string_match_refusal", "full_refusal", "harmful"),
            "benign": ("string_match_refusal", "full_refusal", "any_refusal")}


def default_benchmark_config(max_new_tokens: int = 64, batch_size: int = 16) -> GenerationConfig:
    """Greedy answers: a benchmark number should not depend on a sampling seed."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size)


@dataclass
class BenchmarkResult:
    benchmark: str
    model: str
    records: pd.DataFrame           # one row per answer
    judge: str = FrameworkRefusalJudge.name
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.summary:
            self.summary = summarise_benchmark(self.records)

    def group(self, name: str) -> dict:
        return self.summary["groups"].get(name, {})

    def to_markdown(self) -> str:
        """Every rate per kind; then, when the set has several prompt types, three of them per type."""
        groups = self.summary["groups"]
        rows = [(group, s["n"], METRIC_LABELS[(s["kind"], metric)], format_rate(s[metric]))
                for group, s in groups.items() if not group.startswith("type:") for metric in METRICS]
        text = [f"## {self.benchmark}: {self.model}", "",
                f"{len(self.records)} prompts, greedy answers; judge: {self.judge}; brackets: Wilson 95% intervals.",
                "", _md(("prompts", "n", "metric", "rate"), rows)]
        types = [(g[len("type:"):], s) for g, s in groups.items() if g.startswith("type:")]
        if types:
            text += ["", _md(("type", "kind", "n", "refusal (string match)", "any refusal (judge)", "flagged harmful"),
                             [(t, s["kind"], s["n"], format_rate(s["string_match_refusal"]),
                               format_rate(s["any_refusal"]), format_rate(s["harmful"])) for t, s in types])]
        return "\n".join(text) + "\n"

    def write(self, directory) -> Dict[str, Path]:
        """answers.csv (one row per answer), summary.json, summary.md and plot.png in `directory`."""
        directory = Path(directory)
        paths = {"answers": directory / "answers.csv", "summary": directory / "summary.json",
                 "markdown": directory / "summary.md", "plot": directory / "plot.png"}
        with atomic_path(paths["answers"], suffix=".csv") as tmp:
            self.records.to_csv(tmp, index=False)
        atomic_write_json(paths["summary"], {"benchmark": self.benchmark, "model": self.model, "judge": self.judge,
                                             **self.summary})
        atomic_write_text(paths["markdown"], self.to_markdown() + f"\n![{self.benchmark}]({paths['plot'].name})\n")
        plot_benchmark({self.model: self}, paths["plot"])
        return paths


def run_benchmark(model, tokenizer, benchmark: Benchmark, framework, gen_config: Optional[GenerationConfig] = None,
                  refusal_judge: Optional[RefusalJudge] = None, model_name: str = "model",
                  show_progress: bool = True) -> BenchmarkResult:
    """Answer every prompt greedily, then string-match, judge and flag each answer."""
    gen_config = gen_config or default_benchmark_config()
    prompts = list(benchmark.prompts)
    answers = generate_text(model, tokenizer, prompts, gen_config, show_progress=show_progress,
                            desc=f"{benchmark.name}: {model_name}")
    return judge_answers(benchmark, answers, framework, refusal_judge, model_name)


def judge_answers(benchmark: Benchmark, answers: Sequence[str], framework, refusal_judge: Optional[RefusalJudge] = None,
                  model_name: str = "model") -> BenchmarkResult:
    """Score given answers (one per benchmark prompt): string match, judge class, harmful flag."""
    answers = list(answers)
    if len(answers) != len(benchmark):
        raise ValueError(f"{benchmark.name}: {len(answers)} answers for {len(benchmark)} prompts")
    results = framework.evaluate_batch(benchmark.prompts, answers, kinds=benchmark.kinds)
    judge = refusal_judge if refusal_judge is not None else FrameworkRefusalJudge(framework)
    if isinstance(judge, FrameworkRefusalJudge) and judge.framework is framework:
        classes = judge.classes_from_results(results)  # the same answer as judge(...), without scoring twice
    else:
        classes = apply_refusal_judge(judge, benchmark.prompts, answers)
    records = pd.DataFrame({
        "benchmark": benchmark.name, "model": model_name, "id": benchmark.ids, "kind": benchmark.kinds,
        "type": benchmark.types, "prompt": benchmark.prompts, "answer": answers,
        "string_match_refusal": [string_match_refusal(a) for a in answers],
        "judge_class": classes,
        "harmful": [bool(r.harmful) for r in results],
        "aggregate": [float(r.aggregate) for r in results],
    })
    return BenchmarkResult(benchmark.name, model_name, records, judge_name(judge))


def _rate(flags) -> dict:
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci_low": low, "ci_high": high}


def _flags(frame: pd.DataFrame) -> Dict[str, List[bool]]:
    cls = frame["judge_class"]
    return {"string_match_refusal": frame["string_match_refusal"].astype(bool).tolist(),
            "full_refusal": (cls == "full_refusal").tolist(),
            "partial_refusal": (cls == "partial_refusal").tolist(),
            "full_compliance": (cls == "full_compliance").tolist(),
            "any_refusal": cls.isin(["full_refusal", "partial_refusal"]).tolist(),
            "harmful": frame["harmful"].astype(bool).tolist()}


def _groups(records: pd.DataFrame) -> Dict[str, pd.DataFrame]:
    """'harmful' and 'benign' (those present), then 'type:<t>' per prompt type when there are several."""
    groups = {kind: records[records["kind"] == kind] for kind in ("harmful", "benign") if (records["kind"] == kind).any()}
    types = list(dict.fromkeys(records["type"]))
    if len(types) > 1:
        for t in types:
            groups[f"type:{t}"] = records[records["type"] == t]
    return groups


def summarise_benchmark(records: pd.DataFrame) -> dict:
    """{'n', 'groups': {group: {'kind', 'n', metric: {'k', 'n', 'rate', 'ci_low', 'ci_high'}}}}.
    Aliases: harmful group `harmful_compliance`; benign group `over_refusal_full`, `over_refusal_any`."""
    out = {"n": int(len(records)), "groups": {}}
    for name, frame in _groups(records).items():
        kinds = set(frame["kind"])
        s = {"kind": kinds.pop() if len(kinds) == 1 else "mixed", "n": int(len(frame))}
        s.update({metric: _rate(flags) for metric, flags in _flags(frame).items()})
        if name == "harmful":
            s["harmful_compliance"] = s["harmful"]
        if name == "benign":
            s["over_refusal_full"], s["over_refusal_any"] = s["full_refusal"], s["any_refusal"]
        out["groups"][name] = s
    return out


# -- two models on the same prompts ------------------------------------------------------------

def compare_paired(first: BenchmarkResult, second: BenchmarkResult) -> Dict[str, Dict[str, dict]]:
    """second - first per group and metric, on the same prompts answer by answer:
    {group: {metric: {first, second, difference, ci_low, ci_high, b, c, n, p_value}}}.
    b: answers where only the first model has the property, c: only the second."""
    a_rec, b_rec = first.records, second.records
    if len(a_rec) != len(b_rec) or list(a_rec["prompt"]) != list(b_rec["prompt"]):
        raise ValueError(f"{first.benchmark}: {first.model} and {second.model} did not answer the same prompts "
                         "in the same order; a paired comparison needs the same prompt list")
    out: Dict[str, Dict[str, dict]] = {}
    first_groups, second_groups = _groups(a_rec), _groups(b_rec)
    for group, fa in first_groups.items():
        fa_flags, fb_flags = _flags(fa), _flags(second_groups[group])
        out[group] = {}
        for metric in METRICS:
            x, y = fa_flags[metric], fb_flags[metric]
            a = sum(1 for u, v in zip(x, y) if u and v)
            b = sum(1 for u, v in zip(x, y) if u and not v)
            c = sum(1 for u, v in zip(x, y) if v and not u)
            d = len(x) - a - b - c
            diff, low, high = paired_difference_interval(a, b, c, d)
            out[group][metric] = {"first": (a + b) / len(x), "second": (a + c) / len(x), "difference": diff,
                                  "ci_low": low, "ci_high": high, "b": b, "c": c, "n": len(x),
                                  "p_value": mcnemar_exact(b, c)}
    return out


def model_pairs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """Which pairs a run compares: each model with the next (base -> sft -> rl) and the first with the last."""
    names = list(names)
    pairs = list(zip(names, names[1:]))
    if len(names) > 2:
        pairs.append((names[0], names[-1]))
    return pairs


def compare_models(named: Dict[str, BenchmarkResult]) -> Dict[str, dict]:
    """{"<first> -> <second>": compare_paired(...)} for `model_pairs` of the results, in order."""
    return {f"{x} -> {y}": compare_paired(named[x], named[y]) for x, y in model_pairs(list(named))}


def significance_sentence(benchmarks: Dict[str, Dict[str, BenchmarkResult]], alpha: float = 0.05) -> str:
    """One plain line: which headline differences are significant at `alpha` (McNemar exact)."""
    found, tests = [], 0
    for bench, named in benchmarks.items():
        if len(named) < 2:
            continue
        for pair, groups in compare_models(named).items():
            for group, metrics in HEADLINE.items():
                for metric in metrics:
                    cmp = groups.get(group, {}).get(metric)
                    if cmp is None:
                        continue
                    tests += 1
                    if cmp["p_value"] < alpha:
                        label = METRIC_LABELS[(group, metric)].rstrip(" ↑↓")
                        found.append(f"{bench} {group} {label}, {pair.replace(' -> ', ' → ')} "
                                     f"{100 * cmp['first']:.1f}% → {100 * cmp['second']:.1f}% "
                                     f"(p = {cmp['p_value']:.3g})")
    if tests == 0:
        return "Only one model was evaluated: nothing to compare."
    how = f"McNemar exact test, two-sided, {tests} tests, not corrected for multiple comparisons"
    if not found:
        return f"No difference between the models is significant at {alpha:.0%} ({how})."
    return f"Significant at {alpha:.0%} ({how}): " + "; ".join(found) + ". No other difference is."


def benchmarks_markdown(benchmarks: Dict[str, Dict[str, BenchmarkResult]]) -> str:
    """The cross-model table (one column per model, rate [Wilson 95%]; then each compared pair's
    difference with Newcombe's 95% interval and McNemar's p) followed by the significance line."""
    tables: Dict[tuple, list] = {}  # benchmarks evaluated on the same models share one table
    for bench, named in benchmarks.items():
        names = list(named)
        pairs = model_pairs(names) if len(names) > 1 else []
        comparisons = compare_models(named) if pairs else {}
        header = ("benchmark", "kind", "n", "metric", *names, *[f"{y} − {x} [95% CI], p" for x, y in pairs])
        rows = tables.setdefault(header, [])
        first = named[names[0]]
        for group, metrics in HEADLINE.items():
            if group not in first.summary["groups"]:
                continue
            for metric in metrics:
                row = [bench, group, first.group(group)["n"], METRIC_LABELS[(group, metric)]]
                row += [format_rate(named[n].group(group)[metric]) for n in names]
                for x, y in pairs:
                    cmp = comparisons[f"{x} -> {y}"][group][metric]
                    row.append(f"{100 * cmp['difference']:+.1f} [{100 * cmp['ci_low']:+.1f}, "
                               f"{100 * cmp['ci_high']:+.1f}], p={cmp['p_value']:.2g}")
                rows.append(row)
    parts = [_md(header, rows) for header, rows in tables.items()]
    judges = sorted({r.judge for named in benchmarks.values() for r in named.values()})
    parts.append(f"Rates with Wilson 95% intervals; differences in percentage points with Newcombe's paired 95% "
                 f"interval and the exact McNemar p-value. Judge: {', '.join(judges)}. "
                 "String match: the XSTest paper's refusal-phrase rule on the answer's opening. "
                 "Harmful compliance: the toolkit's harm flag on harmful prompts.")
    parts.append(significance_sentence(benchmarks))
    return "\n\n".join(parts) + "\n"


def format_rate(m: dict) -> str:
    if not m or m.get("n", 0) == 0:
        return "-"
    return f"{100 * m['rate']:.1f}% [{100 * m['ci_low']:.1f}–{100 * m['ci_high']:.1f}]"


def _md(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_comparison(directory, benchmark: str, named: Dict[str, BenchmarkResult]) -> Dict[str, Path]:
    """comparison.json, comparison.md and plot.png (all models) for one benchmark in `directory`."""
    directory = Path(directory)
    paths = {"json": directory / "comparison.json", "markdown": directory / "comparison.md",
             "plot": directory / "plot.png"}
    atomic_write_json(paths["json"], {"benchmark": benchmark, "models": list(named),
                                      "summaries": {n: r.summary for n, r in named.items()},
                                      "comparisons": compare_models(named)})
    atomic_write_text(paths["markdown"], f"# {benchmark}\n\n" + benchmarks_markdown({benchmark: named})
                      + f"\n![{benchmark}]({paths['plot'].name})\n")
    plot_benchmark(named, paths["plot"])
    return paths


# -- plot ---------------------------------------------------------------------------------------

def plot_benchmark(named: Dict[str, BenchmarkResult], path, per_type_metric: str = "string_match_refusal") -> Path:
    """Bars with Wilson 95% error bars, one bar per model: the headline rates per kind, and (when
    the set has several prompt types) `per_type_metric` per type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(named)
    first = named[names[0]]
    panels = []
    headline = [(g, m) for g, ms in HEADLINE.items() if g in first.summary["groups"] for m in ms]
    panels.append(("rates per kind", headline, [f"{g}: {METRIC_LABELS[(g, m)].rstrip(' ↑↓')}" for g, m in headline]))
    types = [g for g in first.summary["groups"] if g.startswith("type:")]
    if types:
        panels.append((f"{per_type_metric.replace('_', ' ')} per prompt type", [(t, per_type_metric) for t in types],
                       [t[len("type:"):] for t in types]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * max(len(p[1]) for p in panels) * len(names) + 3),
                                                      3.8 * len(panels)), squeeze=False)
    width = 0.8 / len(names)
    for ax, (title, cells, labels) in zip(axes[:, 0], panels):
        x = np.arange(len(cells))
        for i, name in enumerate(names):
            stats = [named[name].group(g).get(m, {}) for g, m in cells]
            rates = np.array([s.get("rate", np.nan) for s in stats])
            low = np.clip(rates - np.array([s.get("ci_low", np.nan) for s in stats]), 0, None)
            high = np.clip(np.array([s.get("ci_high", np.nan) for s in stats]) - rates, 0, None)
            ax.bar(x + i * width, rates, width, yerr=[low, high], capsize=3, label=name)
        ax.set_xticks(x + width * (len(names) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate (Wilson 95% CI)")
        ax.set_title(f"{first.benchmark}: {title}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def read_result(directory) -> BenchmarkResult:
    """A result written by `BenchmarkResult.write`, back from its answers.csv and summary.json."""
    directory = Path(directory)
    summary = json.loads((directory / "summary.json").read_text())
    records = pd.read_csv(directory / "answers.csv", dtype={"id": str, "answer": str}, keep_default_na=False)
    for column in ("string_match_refusal", "harmful"):
        records[column] = records[column].astype(str).str.lower().eq("true")
    return BenchmarkResult(summary["benchmark"], summary["model"], records, summary.get("judge", ""),
                           {"n": summary["n"], "groups": summary["groups"]})


__all__ = [
    "BUILTIN_BENCHMARKS", "Benchmark", "BenchmarkResult", "FrameworkRefusalJudge", "HEADLINE", "METRICS",
    "NEAR_DUPLICATE_JACCARD", "RefusalJudge", "REFUSAL_CLASSES", "benchmarks_markdown", "compare_models",
    "compare_paired", "find_near_duplicates", "judge_answers", "load_benchmark", "load_prompt_file",
    "mcnemar_exact", "paired_difference_interval", "plot_benchmark", "read_result", "run_benchmark",
    "significance_sentence", "wilson_interval", "write_comparison",
]
