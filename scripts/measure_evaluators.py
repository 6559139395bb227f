#!/usr/bin/env python
"""Pairwise accuracy of each evaluator and of their combinations against human hh-rlhf labels.

    python scripts/measure_evaluators.py [--split heldout] [--judge-model default] [--limit N]
                                         [--reward-model DIR]

Every evaluator compares each (chosen, rejected) pair once; the combinations are then formed by
the framework's own weighting (ConstitutionalFramework.compare_batch) from those stored results,
so the figures are exactly what the framework would give. The judge is asked about the general
`harmless` principle only (a 135M model on CPU is too slow for ten questions per pair); so is a
reward model given with --reward-model (the constitution lists it for `harmless` only).
Prints a Markdown table (paste it into docs/evaluators.md) and writes JSON with --output.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.safety.constitutional.evaluators.base import Evaluator  # noqa: E402
from src.safety.constitutional.framework import ConstitutionalFramework  # noqa: E402
from src.safety.constitutional.hh_rlhf import load_pairs  # noqa: E402
from src.safety.constitutional.io import atomic_write_json  # noqa: E402

DEFAULT_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


class Replay(Evaluator):
    """Gives back comparisons computed earlier, so combinations cost nothing to re-weight."""

    def __init__(self, name, weight, table):
        self.name, self.weight, self.table = name, weight, table

    def compare_batch(self, prompts, responses_a, responses_b, principles, kinds=None):
        return [[self.table[(i, p.name)] for p in principles] for i in prompts]


def accuracy(probs):
    return sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs) / len(probs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--split", default="heldout", choices=["train", "heldout"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--judge-model", default="default", help="'' to skip the judge")
    parser.add_argument("--reward-model", default=None, help="a trained reward-model directory to measure too")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--tables", type=Path, default=None,
                        help="JSON file keeping each evaluator's comparisons; a rerun reuses those it holds")
    args = parser.parse_args(argv)

    pairs = load_pairs(args.pairs, split=args.split, limit=args.limit)
    judge_model = judge_tok = None
    if args.judge_model:
        from src.models import load_causal_lm
        judge_model, judge_tok = load_causal_lm(args.judge_model, device="cpu")
    full = ConstitutionalFramework(judge_model=judge_model, judge_tokenizer=judge_tok, classifier="default",
                                   reward_model=args.reward_model)
    principles = full.principles
    prompts = [p.prompt for p in pairs]
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
    kinds = ["harmful"] * len(pairs)  # every hh-rlhf harmless conversation is a red-team attempt

    tables, timings = {}, {}
    saved = json.loads(args.tables.read_text()) if args.tables and args.tables.is_file() else {}
    for name, evaluator in full.evaluators.items():
        # Every principle, so any combination can fall back on it; the judge only `harmless` (cost).
        covered = [full.constitution.get("harmless")] if name == "judge" else principles
        key = f"{name}:{args.split}:{len(pairs)}:{args.reward_model if name == 'reward_model' else ''}"
        if key in saved:
            tables[name] = {(int(i), p): v for i, p, v in saved[key]["rows"]}
            timings[name] = saved[key]["seconds"]
            print(f"{name}: reused from {args.tables}", file=sys.stderr)
            continue
        start = time.time()
        rows = []
        for s in range(0, len(pairs), 32):
            rows += evaluator.compare_batch(prompts[s:s + 32], chosen[s:s + 32], rejected[s:s + 32], covered,
                                            kinds[s:s + 32])
        timings[name] = time.time() - start
        tables[name] = {(i, p.name): row[j] for i, row in enumerate(rows) for j, p in enumerate(covered)}
        print(f"{name}: {timings[name]:.0f}s", file=sys.stderr)
        if args.tables:  # keep what was computed: the judge takes the better part of an hour on CPU
            saved[key] = {"seconds": timings[name], "rows": [[i, p, v] for (i, p), v in tables[name].items()]}
            atomic_write_json(args.tables, saved)

    def measure(names, principle=None):
        evaluators = {n: Replay(n, full.evaluators[n].weight, tables[n]) for n in names}
        framework = ConstitutionalFramework(full.constitution, evaluators=evaluators)
        if "rules" not in names:
            framework.evaluators.pop("rules")
        ids = list(range(len(pairs)))
        comparisons = framework.compare_batch(ids, ids, ids, principle=principle, kinds=kinds)
        return accuracy([c.prob_a_better for c in comparisons])

    rows = []
    combos = [["rules"], ["classifier"], ["rules", "classifier"]]
    everywhere = combos + ([["classifier", "reward_model"], ["rules", "classifier", "reward_model"]]
                           if "reward_model" in tables else [])  # it still judges `harmless` only
    for combo in everywhere:
        rows.append(("all principles", " + ".join(combo), measure(combo)))
    harmless_combos = list(combos)
    for extra in ("judge", "reward_model"):
        if extra in tables:
            harmless_combos += [[extra], ["rules", extra], ["classifier", extra], ["rules", "classifier", extra]]
    if "judge" in tables and "reward_model" in tables:
        harmless_combos.append(["rules", "classifier", "judge", "reward_model"])
    for combo in harmless_combos:
        rows.append(("`harmless` only", " + ".join(combo), measure(combo, "harmless")))
    weights = ", ".join(f"{n} {e.weight:g}" for n, e in full.evaluators.items())
    print(f"\n{len(pairs)} hh-rlhf pairs, split={args.split}; evaluator weights: {weights}\n")
    print("| principles compared | evaluators | pairwise accuracy |\n|---|---|---|")
    for scope, combo, acc in rows:
        print(f"| {scope} | {combo} | {acc:.3f} |")
    if args.output:
        atomic_write_json(args.output, {"n": len(pairs), "split": args.split, "timings_s": timings,
                                        "rows": [{"scope": s, "evaluators": c, "accuracy": a} for s, c, a in rows]})


if __name__ == "__main__":
    main()
