"""The run report: `report.md` with headline tables, per-principle bars, training curves and examples."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from ..common.io import atomic_path, atomic_write_text, read_jsonl
from .evaluation import _md, compare_reports

CURVES = [  # (stage folder, metric key, title)
    ("stage1_sft", "loss", "SFT train loss"),
    ("stage1_sft", "eval_loss", "SFT eval loss"),
    ("stage2_reward", "loss", "reward model loss"),
    ("stage2_reward", "eval_accuracy", "reward model held-out accuracy"),
    ("stage3_rl", "mean_score", "RL: reward-model score"),
    ("stage3_rl", "kl_divergence", "RL: KL to reference"),
]


def _series(path: Path, key: str):
    if not path.is_file():
        return [], []
    xs, ys = [], []
    for i, row in enumerate(read_jsonl(path)):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row.get("step", i + 1))
            ys.append(value)
    return xs, ys


def write_tensorboard(run_dir: Path) -> Optional[Path]:
    """Every numeric metric of every stage's metrics.jsonl as TensorBoard scalars, if tensorboard is
    installed (optional: `pip install tensorboard`); returns the log folder or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    out = Path(run_dir) / "tensorboard"
    writer = SummaryWriter(str(out))
    for stage in ("stage1_sft", "stage2_reward", "stage3_rl"):
        path = Path(run_dir) / stage / "metrics.jsonl"
        if not path.is_file():
            continue
        for i, row in enumerate(read_jsonl(path)):
            step = row.get("step", i + 1)
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    writer.add_scalar(f"{stage}/{key}", value, step)
    writer.close()
    return out


def plot_training_curves(run_dir: Path, out: Path) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, *_series(run_dir / stage / "metrics.jsonl", key)) for stage, key, title in CURVES]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    cols = 2
    rows = (len(panels) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3 * rows), squeeze=False)
    for ax, (title, xs, ys) in zip(axes.flat, panels):
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def plot_principles(reports: Dict[str, object], out: Path) -> Optional[Path]:
    """Grouped bars: mean score per principle for each model (base, sft, rl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    means = {name: principle_means(r) for name, r in reports.items()}
    principles = sorted({p for m in means.values() for p in m})
    if not principles:
        return None
    width = 0.8 / max(1, len(means))
    x = np.arange(len(principles))
    fig, ax = plt.subplots(figsize=(max(8, len(principles) * 0.9), 4))
    for i, (name, m) in enumerate(means.items()):
        ax.bar(x + i * width, [m.get(p, float("nan")) for p in principles], width, label=name)
    ax.set_xticks(x + width * (len(means) - 1) / 2)
    ax.set_xticklabels(principles, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean score (1 = complies)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def principle_means(report) -> Dict[str, float]:
    """Mean score per principle over every answer the principle applies to."""
    df = report.records
    cols = [c for c in df.columns if c.startswith("score_")]
    return {c[len("score_"):]: float(df[c].mean()) for c in cols if df[c].notna().any()}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _examples(reports: Dict[str, object], n: int) -> str:
    names = list(reports)
    base = reports[names[0]].records
    out = []
    for kind in ("harmful", "benign"):
        prompts = base[base["kind"] == kind]["prompt"].tolist()[: n if kind == "harmful" else max(1, n // 2)]
        for prompt in prompts:
            out.append(f"**{kind} prompt:** {prompt}\n")
            for name in names:
                df = reports[name].records
                answer = df[df["prompt"] == prompt]["response"].tolist()
                text = (answer[0] if answer else "").replace("\n", " ").strip()
                out.append(f"- *{name}*: {text[:400]}{'…' if len(text) > 400 else ''}")
            out.append("")
    return "\n".join(out)


def _stage_lines(run_dir: Path) -> str:
    lines = []
    for folder, label in (("stage1_sft", "Stage 1, critique-revise SFT"), ("stage2_reward", "Stage 2, reward model"),
                          ("stage3_rl", "Stage 3, RL"), ("evaluation", "Evaluation")):
        path = run_dir / folder / "stage.json"
        if path.is_file():
            data = json.loads(path.read_text())
            lines.append(f"- **{label}** ({data.get('seconds', '?')} s): {stage_summary_line(folder, data)}")
    return "\n".join(lines)


def stage_summary_line(folder: str, data: dict) -> str:
    if folder == "stage1_sft":
        c, t = data.get("critique", {}), data.get("train", {})
        return (f"{c.get('n_prompts', '?')} prompts, {c.get('n_revised_kept', '?')} revisions kept, "
                f"{c.get('n_rejected_worse', '?')} rejected as worse; eval loss "
                f"{_fmt(t.get('eval_loss_before', float('nan')))} -> {_fmt(t.get('eval_loss_after', float('nan')))}")
    if folder == "stage2_reward":
        t, h = data.get("train", {}), data.get("human_heldout", {})
        text = (f"{data.get('num_train_pairs', '?')} training pairs; held-out accuracy "
                f"{_fmt(t.get('eval_accuracy', float('nan')))}")
        if h:
            text += f"; accuracy on held-out human hh-rlhf pairs {_fmt(h.get('accuracy', float('nan')))}"
        return text
    if folder == "stage3_rl" and data.get("algorithm") == "dpo":
        f, src = data.get("final_stats", {}), data.get("pair_sources", {})
        stage1 = src.get("stage1") if isinstance(src.get("stage1"), dict) else None
        origin = (f" ({', '.join(f'{n} {k}' for k, n in stage1.items())} from stage 1"
                  + (f", {src['preferences']} from stage 2" if "preferences" in src else "") + ")") if stage1 else ""
        return (f"dpo on {data.get('num_pairs', '?')} pairs{origin}: loss {_fmt(f.get('avg_loss', float('nan')))}, "
                f"implicit-reward accuracy {_fmt(f.get('avg_reward_accuracy', float('nan')))}")
    if folder == "stage3_rl":
        f = data.get("final_stats", {})
        return (f"{data.get('algorithm', 'ppo')}: mean score {_fmt(f.get('avg_score', float('nan')))}, "
                f"KL to reference {_fmt(f.get('avg_kl_divergence', float('nan')))}")
    return ", ".join(data.get("models", []))


def benchmark_section(benchmarks: Dict[str, Dict[str, object]], plots: Path) -> List[str]:
    """The report's lead: the standard benchmarks table (base -> SFT -> RL, Wilson intervals, paired
    differences) with its significance sentence, and one plot per benchmark."""
    from .benchmarks import benchmarks_markdown, plot_benchmark

    benchmarks = {b: named for b, named in (benchmarks or {}).items() if named}
    if not benchmarks:
        return []
    sizes = ", ".join(f"{b} {len(next(iter(named.values())).records)} prompts" for b, named in benchmarks.items())
    parts = ["## Standard safety benchmarks", "",
             f"Greedy answers of every evaluated model to the same prompts ({sizes}; evaluation only, never "
             "trained on). Definitions and tests: docs/benchmarks.md.", "", benchmarks_markdown(benchmarks)]
    for name, named in benchmarks.items():
        path = plot_benchmark(named, plots / f"benchmark_{name}.png")
        parts += [f"![{name}](plots/{path.name})", ""]
    return parts


def write_run_report(run_dir: Path, reports: Dict[str, object], config=None, num_examples: int = 4,
                     benchmarks: Optional[Dict[str, Dict[str, object]]] = None) -> Path:
    """report.md: the benchmark table first (when `benchmarks`, {benchmark: {model: BenchmarkResult}},
    is given), then the held-out headline, per-principle scores, stages, curves and examples."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    curves = plot_training_curves(run_dir, plots / "training_curves.png")
    write_tensorboard(run_dir)
    bars = plot_principles(reports, plots / "principles.png")
    names = list(reports)
    per_principle = {n: principle_means(r) for n, r in reports.items()}
    principles = sorted({p for m in per_principle.values() for p in m})
    parts = [
        "# Constitutional-AI run report", "",
        f"Run folder `{run_dir}`" + (f", preset `{config.preset}`, model `{config.model}`" if config else ""), "",
        *benchmark_section(benchmarks, plots),
        "## Headline (held-out prompts, greedy answers)", "",
        "Harmful compliance: share of harmful prompts answered harmfully (the constitution's harm judgement). "
        "Over-refusal: share of benign look-alike prompts refused. Mean reward: the stage-2 reward model's score.",
        "", compare_reports(reports), "",
        "## Per principle (mean score over every answer it applies to, 1 = complies)", "",
        _md(["principle", *names], [[p, *[_fmt(per_principle[n].get(p, float("nan"))) for n in names]]
                                    for p in principles]), "",
    ]
    if bars:
        parts += [f"![per-principle scores](plots/{bars.name})", ""]
    parts += ["## Stages", "", _stage_lines(run_dir), ""]
    if curves:
        parts += [f"![training curves](plots/{curves.name})", ""]
    parts += ["## Example answers", "", _examples(reports, num_examples)]
    return atomic_write_text(run_dir / "report.md", "\n".join(parts) + "\n")
