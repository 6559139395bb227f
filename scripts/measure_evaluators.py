#!/usr/bin/env python
"""Judge report: how well does an evaluator, or a combination, agree with human labels on your file?

    # preference pairs (hh-rlhf transcripts or {prompt, chosen, rejected}): pairwise accuracy
    python scripts/measure_evaluators.py --pairs ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz \\
        --split heldout --evaluators rules,classifier,rules+classifier
    # labelled answers (CSV or JSONL with prompt, completion, label): 3-class refusal agreement,
    # with the XSTest string match always shown as the baseline
    python scripts/measure_evaluators.py --answers completions.csv --label-column final_label --evaluators rules
    # answers labelled harmful true/false: single-answer harm judges
    python scripts/measure_evaluators.py --answers judged.jsonl --task harm --label-column harmful

Evaluators are looked up by name in src/safety/constitutional/judging/judge_report.py's registry
(`register_evaluator`); "a+b" measures the framework's weighted combination of framework evaluators
(rules, classifier, judge, reward_model), reusing each one's results, so combinations cost nothing
extra. Prints a Markdown table and confusion matrices; --output DIR also writes report.json (every
metric and per-item probabilities), report.md and reliability_<evaluator>.png. The old --tables
cache is gone: report.json keeps each evaluator's per-item probabilities instead. See
docs/evaluators.md, "Judge report".
"""
import argparse
import sys
from pathlib import Path


from src.safety.constitutional.judging.judge_report import (  # noqa: E402
                                                            EvaluatorOptions, available_evaluators, load_answer_set, load_pair_set, render_markdown, run_report,
                                                            write_report)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, help="preference pairs, JSONL(.gz): chosen/rejected")
    source.add_argument("--answers", type=Path, help="labelled answers, CSV or JSONL(.gz)")
    p.add_argument("--task", choices=["refusal", "harm"], default="refusal",
                   help="with --answers: 3-class refusal labels, or a binary harmful label")
    p.add_argument("--split", default=None,
                   help="pairs: train | heldout | all (the fixed hh-rlhf split; default all); answers: keep rows "
                        "whose `split` column equals this (e.g. test; default all rows)")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--completion-column", default="completion")
    p.add_argument("--label-column", default="label")
    p.add_argument("--limit", type=int, default=None, help="the first N items only")
    p.add_argument("--evaluators", default="rules,classifier",
                   help=f"comma-separated names ({', '.join(available_evaluators())}) or a+b combinations")
    p.add_argument("--judge-model", default="default", help="chat model for the judge evaluator")
    p.add_argument("--reward-model", default=None, help="trained reward-model directory (reward_model evaluator)")
    p.add_argument("--pair-kind", choices=["harmful", "benign", "detect"], default="harmful",
                   help="pairs: the prompts' kind for the framework (hh-rlhf harmless talks are red-team attempts)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bins", type=int, default=10, help="equal-width bins for ECE and the reliability diagram")
    p.add_argument("--output", type=Path, default=None, help="folder for report.json, report.md, PNGs")
    args = p.parse_args(argv)
    args.evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
    if args.pairs is not None and args.split not in (None, "all", "train", "heldout"):
        p.error(f"--split with --pairs must be train, heldout or all, not {args.split!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from src.models import configure_threads
    configure_threads()  # $CAI_NUM_THREADS, else adaptive: the cores other processes leave free (src/models/threads.py)
    if args.pairs is not None:
        data = load_pair_set(args.pairs, split=args.split, limit=args.limit)
    else:
        data = load_answer_set(args.answers, task=args.task, prompt_column=args.prompt_column,
                               completion_column=args.completion_column, label_column=args.label_column,
                               split=args.split, limit=args.limit)
    options = EvaluatorOptions(judge_model=args.judge_model, reward_model=args.reward_model,
                               pair_kind=None if args.pair_kind == "detect" else args.pair_kind, device=args.device)
    report = run_report(data, args.evaluators, options, n_resamples=args.resamples, seed=args.seed,
                        n_bins=args.bins, log=lambda line: print(line, file=sys.stderr))
    if args.output:
        for path in write_report(report, args.output):
            print(f"wrote {path}", file=sys.stderr)
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
