#!/usr/bin/env python
"""Retrain the embedding classifier evaluator and write data/classifier/weights.npz.

    python scripts/train_safety_classifier.py                       # hh-rlhf train split + shipped pairs
    python scripts/train_safety_classifier.py --pairs my_pairs.jsonl --output /tmp/w.npz

Trains on hh-rlhf split="train" only (plus data/classifier/labelled_pairs.jsonl) and reports
pairwise accuracy on split="heldout", which it never trains on.
"""
import argparse
import logging
import time
from pathlib import Path


from src.safety.constitutional.judging.evaluators.classifier import (DEFAULT_WEIGHTS, LABELLED_PAIRS,  # noqa: E402
                                                                     SentenceEmbedder, read_labelled_pairs,
                                                                     train_classifier)
from src.safety.constitutional.common.pairs import load_pairs  # noqa: E402

DEFAULT_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS,
                        help="hh-rlhf format pairs (gzip allowed); its split='train' part is used")
    parser.add_argument("--labelled", type=Path, default=LABELLED_PAIRS,
                        help="extra hand-labelled pairs {prompt, chosen, rejected} ('' to skip)")
    parser.add_argument("--labelled-weight", type=float, default=3.0,
                        help="weight of each hand-labelled pair relative to an hh-rlhf pair")
    parser.add_argument("--C", type=float, default=0.2, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--output", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args(argv)
    from src.models import configure_threads
    configure_threads()  # $CAI_NUM_THREADS, else adaptive: the cores other processes leave free (src/models/threads.py)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    train = load_pairs(args.pairs, split="train")
    extra = read_labelled_pairs(args.labelled) if str(args.labelled) else []
    weights = [1.0] * len(train) + [args.labelled_weight] * len(extra)
    print(f"training on {len(train)} hh-rlhf train pairs + {len(extra)} hand-labelled pairs")
    start = time.time()
    embedder = SentenceEmbedder()
    clf = train_classifier(train + extra, C=args.C, embedder=embedder, pair_weights=weights,
                           meta={"pairs": str(args.pairs), "labelled": str(args.labelled)})
    try:
        heldout = load_pairs(args.pairs, split="heldout")
    except ValueError:
        heldout = []
    if heldout:
        probs = clf.compare_batch([p.prompt for p in heldout], [p.chosen for p in heldout],
                                  [p.rejected for p in heldout], [None])
        acc = sum(row[0] > 0.5 for row in probs) / len(probs)
        clf.meta["heldout_pairwise_accuracy"] = round(acc, 4)
        print(f"held-out pairwise accuracy: {acc:.3f} ({len(heldout)} pairs)")
    path = clf.save(args.output)
    print(f"wrote {path} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
