"""Report-level evaluation: answer prompt sets with a model, judge every answer, summarise.

    report = evaluate_model(model, tokenizer, {"red_team": (harmful_prompts, "harmful"),
                                               "benign": (benign_prompts, "benign")}, framework)
    print(report.to_markdown()); report.write("runs/eval")
    print(compare_reports({"base": before, "ppo": after}))

Definitions (per prompt set):
    harmful_compliance_rate  harmful prompts whose answer is judged harmful (a harm principle failed
                             and the answer does not decline); lower is better
    over_refusal_rate        benign prompts whose answer declines; lower is better
    refusal_rate             answers that decline, any set
    mean_aggregate           mean of the framework's weighted aggregate score (0..1, higher = complies)
    pass_rate                answers passing every principle that applies
    principle means          mean score per principle over the prompts it applies to
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch

from ..common.io import atomic_path, atomic_write_json, atomic_write_text
from ..training.generation import GenerationConfig, generate
from ..training.reward_scoring import reward_scores

KINDS = ("harmful", "benign")


@dataclass
class EvaluationReport:
    records: pd.DataFrame
    summary: Dict[str, dict]
    principles: List[str] = field(default_factory=list)

    # -- presentation -------------------------------------------------------------------------
    def table_rows(self) -> List[Tuple[str, str, int, str, str, str, str]]:
        rows = []
        for name, s in self.summary.items():
            rows.append((name, s["kind"], s["n"], _pct(s.get("harmful_compliance_rate")),
                         _pct(s.get("over_refusal_rate")), _pct(s["refusal_rate"]), f"{s['mean_aggregate']:.3f}"))
        return rows

    def to_text_table(self) -> str:
        """A fixed-width table for the terminal."""
        header = ("set", "kind", "n", "harmful compliance", "over-refusal", "refusal", "mean score")
        lines = [_fixed(header, self.table_rows())]
        principle_rows = [(p,) + tuple(_num(s["principle_means"].get(p)) for s in self.summary.values())
                          for p in self.principles]
        lines.append(_fixed(("principle (mean score)",) + tuple(self.summary), principle_rows))
        return "\n\n".join(lines)

    def to_markdown(self) -> str:
        header = ("set", "kind", "n", "harmful compliance ↓", "over-refusal ↓", "refusal", "mean score ↑")
        out = ["## Compliance summary", "", _md(header, self.table_rows()), "",
               "Harmful compliance: share of harmful prompts answered with harmful content (not declined). "
               "Over-refusal: share of benign prompts declined. Scores are 0..1, higher = complies better.",
               "", "## Mean score per principle (over the prompts it applies to)", ""]
        rows = [(p,) + tuple(_num(s["principle_means"].get(p)) for s in self.summary.values())
                for p in self.principles]
        out.append(_md(("principle",) + tuple(self.summary), rows))
        if any("mean_reward" in s for s in self.summary.values()):
            out += ["", "Mean reward-model score: " + ", ".join(
                f"{name} {s['mean_reward']:.3f}" for name, s in self.summary.items() if "mean_reward" in s)]
        return "\n".join(out) + "\n"

    def plot(self, path) -> Path:
        """Bar chart: mean score per principle, one bar per prompt set."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.summary)
        width = 0.8 / max(1, len(names))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(self.principles) + 2), 4))
        for i, name in enumerate(names):
            means = self.summary[name]["principle_means"]
            values = [means.get(p) if means.get(p) is not None else 0.0 for p in self.principles]
            ax.bar([x + i * width for x in range(len(self.principles))], values, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(self.principles))])
        ax.set_xticklabels(self.principles, rotation=35, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean score (higher = complies)")
        ax.set_title("Constitutional compliance per principle")
        ax.legend()
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return Path(path)

    def write(self, directory) -> Dict[str, Path]:
        """records.csv, records.json, summary.json, summary.md and principles.png in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"csv": directory / "records.csv", "json": directory / "records.json",
                 "summary": directory / "summary.json", "markdown": directory / "summary.md",
                 "chart": directory / "principles.png"}
        with atomic_path(paths["csv"], suffix=".csv") as tmp:
            self.records.to_csv(tmp, index=False)
        atomic_write_json(paths["json"], _records_json(self.records))
        atomic_write_json(paths["summary"], self.summary)
        self.plot(paths["chart"])
        atomic_write_text(paths["markdown"], self.to_markdown() + f"\n![principle scores]({paths['chart'].name})\n")
        return paths


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _md(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _fixed(header, rows) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def _records_json(frame: pd.DataFrame) -> List[dict]:
    out = []
    for record in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
    return out


# -- scoring with a reward model ---------------------------------------------------------------

@torch.inference_mode()
# -- the evaluation ----------------------------------------------------------------------------

def default_eval_config() -> GenerationConfig:
    """Greedy decoding: the evaluation of a model should not depend on a sampling seed."""
    return GenerationConfig(max_new_tokens=128, do_sample=False, batch_size=16)


def evaluate_model(model, tokenizer, prompt_sets: Dict[str, Tuple[Sequence[str], str]], framework,
                   gen_config: Optional[GenerationConfig] = None, reward_model=None,
                   show_progress: bool = True) -> EvaluationReport:
    """Answer each prompt set with `model`, score every answer with `framework`, summarise per set."""
    if not prompt_sets:
        raise ValueError("prompt_sets is empty: give at least one named (prompts, kind) set")
    gen_config = gen_config or default_eval_config()
    principles = framework.constitution.names
    frames = []
    for name, (prompts, kind) in prompt_sets.items():
        if kind not in KINDS:
            raise ValueError(f"prompt set {name!r}: kind must be 'harmful' or 'benign', got {kind!r}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"prompt set {name!r} is empty")
        responses = generate(model, tokenizer, prompts, gen_config, show_progress=show_progress,
                             desc=f"answering {name}").texts
        results = framework.evaluate_batch(prompts, responses, kinds=kind)
        rows = []
        for prompt, response, result in zip(prompts, responses, results):
            row = {"set": name, "kind": kind, "prompt": prompt, "response": response, "refused": result.refused,
                   "harmful": result.harmful, "passed": result.passed, "aggregate": result.aggregate}
            for principle in principles:
                score = result.scores[principle]
                row[f"score_{principle}"] = score.score if score.applicable else float("nan")
                row[f"reason_{principle}"] = score.reason
            rows.append(row)
        frame = pd.DataFrame(rows)
        if reward_model is not None:
            frame["reward"] = reward_scores(reward_model, tokenizer, prompts, responses,
                                            batch_size=gen_config.batch_size)
        frames.append(frame)
    records = pd.concat(frames, ignore_index=True)
    return EvaluationReport(records, summarise(records, principles), principles)


def summarise(records: pd.DataFrame, principles: Sequence[str]) -> Dict[str, dict]:
    summary = {}
    for name, group in records.groupby("set", sort=False):
        kind = group["kind"].iloc[0]
        s = {"kind": kind, "n": int(len(group)), "refusal_rate": float(group["refused"].mean()),
             "harmful_rate": float(group["harmful"].mean()), "pass_rate": float(group["passed"].mean()),
             "mean_aggregate": float(group["aggregate"].mean()),
             "harmful_compliance_rate": float(group["harmful"].mean()) if kind == "harmful" else None,
             "over_refusal_rate": float(group["refused"].mean()) if kind == "benign" else None}
        means = {}
        for principle in principles:
            column = group[f"score_{principle}"].dropna()
            means[principle] = float(column.mean()) if len(column) else None
        s["principle_means"] = means
        if "reward" in group:
            s["mean_reward"] = float(group["reward"].mean())
        summary[str(name)] = s
    return summary


def compare_reports(named_reports: Dict[str, EvaluationReport]) -> str:
    """Markdown before/after table: one row per (set, metric), one column per report."""
    names = list(named_reports)
    sets = list(dict.fromkeys(s for r in named_reports.values() for s in r.summary))
    metrics = [("harmful_compliance_rate", "harmful compliance ↓", _pct), ("over_refusal_rate", "over-refusal ↓", _pct),
               ("refusal_rate", "refusal", _pct), ("mean_aggregate", "mean score ↑", _num),
               ("mean_reward", "mean reward ↑", _num)]
    rows = []
    for set_name in sets:
        for key, label, fmt in metrics:
            values = [named_reports[n].summary.get(set_name, {}).get(key) for n in names]
            if all(v is None for v in values):
                continue
            rows.append((set_name, label) + tuple(fmt(v) for v in values))
    return _md(("set", "metric") + tuple(names), rows) + "\n"
