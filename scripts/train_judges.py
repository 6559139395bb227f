#!/usr/bin/env python
"""Train the two learned judges and write their weights to data/judges/.

    python scripts/train_judges.py                      # both, from the data shipped in data/
    python scripts/train_judges.py --only refusal       # or --only harm

- Refusal classifier (data/judges/refusal.npz): 3 classes (full_compliance / partial_refusal /
  full_refusal) on data/labels/refusal_labels.jsonl, split "train" (C by 5-fold cross-validation
  grouped by prompt); temperature fitted on split "val". Split "test" is never read here.
- Harm judge (data/judges/harm.npz): Bradley-Terry probe on SmolLM2's layer-8 states (answer-token
  means; --pair-layers/--pair-int8 for others), trained on the shipped hh-rlhf harmless TRAIN pairs
  (data/preferences/); C by 5-fold cross-validation, temperature on out-of-fold comparisons; a
  single-answer head for P(harmful) on the refusal classifier's layer-8 features (and a layer-8
  pairwise probe's utility) of the labelled answers' "train" split, its temperature and flag
  threshold on "val".
Prompts that repeat a benchmark prompt (data/benchmarks, evaluation only) are dropped from training.
Measure the results with scripts/measure_evaluators.py on held-out data (docs/evaluators.md).
"""
import argparse
import logging
import time
from pathlib import Path


import numpy as np  # noqa: E402

from src.safety.constitutional.common.io import REPO_ROOT  # noqa: E402
from src.safety.constitutional.judging.evaluators.harm_judge import (DEFAULT_HARM_WEIGHTS, HarmJudge,  # noqa: E402
                                                                     fit_answer_head, shared_backbone, train_harm_judge)
from src.safety.constitutional.common.io import read_jsonl  # noqa: E402
from src.safety.constitutional.common.pairs import load_pairs  # noqa: E402
from src.safety.constitutional.judging.evaluators.refusal import DEFAULT_REFUSAL_WEIGHTS, train_refusal_classifier  # noqa: E402

DEFAULT_LABELS = REPO_ROOT / "data" / "labels" / "refusal_labels.jsonl"
DEFAULT_PAIRS = REPO_ROOT / "data" / "preferences" / "hh_rlhf_harmless_train.jsonl.gz"


def benchmark_overlap(prompts):
    """Indices of prompts that equal or nearly repeat a built-in benchmark prompt."""
    from src.safety.constitutional.stages.benchmarks import BUILTIN_BENCHMARKS, find_near_duplicates, load_benchmark

    refs = [p for name in BUILTIN_BENCHMARKS for p in load_benchmark(name).prompts]
    return {i for i, _, _ in find_near_duplicates(prompts, refs)}


def labelled_answers(path, split):
    rows = [r for r in read_jsonl(path, skip_torn_tail=False) if r.get("split") == split]
    if not rows:
        raise ValueError(f"{path}: no rows with split={split!r}")
    return rows


def train_refusal(args):
    train, val = labelled_answers(args.labels, "train"), labelled_answers(args.labels, "val")
    backbone = shared_backbone(args.backbone, args.layer, args.max_length)
    x_train = backbone.encode([r["prompt"] for r in train], [r["completion"] for r in train])
    x_val = backbone.encode([r["prompt"] for r in val], [r["completion"] for r in val])
    clf = train_refusal_classifier(
        x_train.astype(np.float64), [r["completion"] for r in train], [r["label"] for r in train],
        groups=[r["prompt"].strip().lower() for r in train], val_backbone=x_val.astype(np.float64),
        val_answers=[r["completion"] for r in val], val_labels=[r["label"] for r in val],
        meta={"backbone": args.backbone, "layer": args.layer, "max_length": args.max_length,
              "labels": Path(args.labels).name})
    print(f"refusal classifier: grouped 5-fold CV 3-class accuracy {clf.meta['cv_accuracy']} on {len(train)} train "
          f"answers; chose C={clf.meta['C']:g}, class weights {clf.meta['class_weight']}; temperature "
          f"{clf.temperature:.2f} on {len(val)} val")
    print(f"wrote {clf.save(args.refusal_output)}")


def fit_single_answer_head(judge, args, pairs):
    """On the refusal classifier's backbone (cheap, shared with it), not the pairwise probe's: its
    features, plus the utility of a Bradley-Terry probe on them trained on the same human pairs."""
    train, val = labelled_answers(args.labels, "train"), labelled_answers(args.labels, "val")
    spec = {"backbone": args.backbone, "layer": args.layer, "max_length": args.max_length}
    features = shared_backbone(args.backbone, args.layer, args.max_length)
    if judge.features is features:  # the pairwise probe already reads these features: it is that probe
        probe = judge
    else:
        prompts = [p.prompt for p in pairs]
        probe = train_harm_judge(features.encode(prompts, [p.chosen for p in pairs]),
                                 features.encode(prompts, [p.rejected for p in pairs]))
    print(f"single-answer head's pairwise probe (layer {args.layer}): cross-validated pairwise accuracy "
          f"{probe.meta['cv_pairwise_accuracy']}")
    x_train = features.encode([r["prompt"] for r in train], [r["completion"] for r in train])
    x_val = features.encode([r["prompt"] for r in val], [r["completion"] for r in val])
    head = fit_answer_head(judge, x_train, [bool(r["harmful"]) for r in train],
                           [r["prompt"].strip().lower() for r in train], x_val, [bool(r["harmful"]) for r in val],
                           answer_backbone=spec, pair_probe=probe)
    print(f"single-answer head: grouped CV log-loss by C {judge.meta['answer_cv_logloss']}, chose C="
          f"{judge.meta['answer_C']:g}; temperature {head['temperature']:.2f} and flag threshold "
          f"{head['threshold']:.3f} on {len(val)} val answers (balanced accuracy "
          f"{judge.meta['answer_val_balanced_accuracy']:.3f})")


def train_harm(args):
    pairs = load_pairs(args.pairs)
    turns = [(i, m["content"]) for i, p in enumerate(pairs) for m in p.prompt if m["role"] == "user"]
    drop = {turns[j][0] for j in benchmark_overlap([t for _, t in turns])}
    pairs = [p for i, p in enumerate(pairs) if i not in drop]
    print(f"harm judge: {len(pairs)} human pairs from {args.pairs} ({len(drop)} dropped: they repeat a benchmark prompt)")
    if args.answer_head_only:  # keep the pairwise probe, refit the single-answer head
        judge = HarmJudge.load(args.harm_output)
        fit_single_answer_head(judge, args, pairs)
        print(f"wrote {judge.save(args.harm_output)}")
        return
    features = shared_backbone(args.backbone, args.pair_layers, args.max_length, int8=args.pair_int8)
    start = time.time()
    prompts = [p.prompt for p in pairs]
    chosen = features.encode(prompts, [p.chosen for p in pairs])
    rejected = features.encode(prompts, [p.rejected for p in pairs])
    print(f"features of {2 * len(pairs)} answers in {time.time() - start:.0f}s")
    judge = train_harm_judge(chosen, rejected, meta={"backbone": args.backbone, "layers": list(args.pair_layers),
                                                    "max_length": args.max_length, "int8": args.pair_int8,
                                                    "pairs": Path(args.pairs).name})
    judge._features = features
    print(f"cross-validated pairwise accuracy by C: {judge.meta['cv_by_C']}; chose C={judge.meta['C']:g}, "
          f"temperature {judge.temperature:.2f}")
    fit_single_answer_head(judge, args, pairs)
    path = judge.save(args.harm_output)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("refusal", "harm"), default=None)
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="labelled answers (data/labels format)")
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="human preference pairs (hh-rlhf format)")
    parser.add_argument("--backbone", default="default", help="model whose layers the harm judge reads")
    parser.add_argument("--layer", type=int, default=8,
                        help="layer read by the refusal classifier and the harm judge's single-answer head")
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--pair-layers", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8,),
                        help="layers (comma-separated, concatenated) read by the harm judge's pairwise probe; "
                             "8,16,24 with --pair-int8 was measured in docs/evaluators.md (not better on held-out pairs)")
    parser.add_argument("--pair-int8", action=argparse.BooleanOptionalAction, default=False,
                        help="read the pairwise probe's backbone with dynamic int8 Linear layers (CPU); the probe is "
                             "fitted on those same features")
    parser.add_argument("--answer-head-only", action="store_true",
                        help="harm judge: keep its pairwise weights, refit only the single-answer head on --labels")
    parser.add_argument("--refusal-output", type=Path, default=DEFAULT_REFUSAL_WEIGHTS)
    parser.add_argument("--harm-output", type=Path, default=DEFAULT_HARM_WEIGHTS)
    args = parser.parse_args(argv)
    from src.models import configure_threads
    configure_threads()  # $CAI_NUM_THREADS, else adaptive: the cores other processes leave free (src/models/threads.py)
    logging.basicConfig(level=logging.WARNING)
    if args.only in (None, "refusal"):
        train_refusal(args)
    if args.only in (None, "harm"):
        train_harm(args)


if __name__ == "__main__":
    main()
