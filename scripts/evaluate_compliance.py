#!/usr/bin/env python
"""Measure a model's constitutional compliance, or the framework's agreement with human labels.

Generate-and-judge mode:
    python scripts/evaluate_compliance.py --model default \\
        --prompts data/prompts/red_team_eval.jsonl --benign data/prompts/benign_eval.jsonl --output runs/eval

  Each prompt file is one set, reported apart. A file is *harmful* (red-team) unless it is given with
  --benign, or its name contains "benign" (the `kind` convention), or every record carries
  "kind": "benign". --prompts takes JSONL (field `prompt`), CSV (column `prompt`, or --column) or TXT.
  Reports per set: harmful-compliance rate (harmful sets), over-refusal rate (benign sets), refusal
  rate, mean score, and the mean score per principle; writes records.csv/json, summary.json,
  summary.md and principles.png to --output.

Benchmark mode (built-in standard safety benchmarks, or your own set; docs/benchmarks.md):
    python scripts/evaluate_compliance.py --benchmark xstest advbench --model default --output runs/bench
    python scripts/evaluate_compliance.py --benchmark advbench --model runs/default/stage3_rl/model \
        --compare-to default --output runs/bench          # paired comparison: model - compare-to
    python scripts/evaluate_compliance.py --benchmark-file harmbench.csv --benchmark-kind harmful --model default

  Greedy answers (--max-new-tokens, default 64 here); per answer the XSTest string-match refusal, the
  refusal judge's class and the toolkit's harmful flag; rates with Wilson 95% intervals, per kind and
  per prompt type. --limit N keeps N prompts spread evenly over each set. Writes, per benchmark,
  <output>/<benchmark>/<model>/answers.csv, summary.json, summary.md, plot.png and, with --compare-to,
  <output>/<benchmark>/comparison.json/.md and plot.png (McNemar exact p, Newcombe 95% intervals).

Pairwise mode:
    python scripts/evaluate_compliance.py --pairs ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz --split heldout

  Compares chosen vs rejected with the framework and prints `pairwise accuracy: 0.NNN`
  (a tie, P = 0.5, counts as half right).
"""
import argparse
import logging
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.safety.constitutional.common.io import atomic_write_json, read_jsonl, read_prompts  # noqa: E402
from src.safety.constitutional.judging.constitution import load_constitution  # noqa: E402
from src.safety.constitutional.judging.framework import ConstitutionalFramework  # noqa: E402

EVALUATOR_CHOICES = ("rules", "classifier", "harm_judge", "judge", "reward_model")
BUILTIN_BENCHMARK_NAMES = ("xstest", "advbench")  # src/safety/constitutional/stages/benchmarks.py: BUILTIN_BENCHMARKS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a checkpoint directory or an HF model directory")
    p.add_argument("--prompts", nargs="+", type=Path, default=[], help="prompt files (harmful unless --benign)")
    p.add_argument("--benign", nargs="+", type=Path, default=[], help="prompt files of benign prompts")
    p.add_argument("--column", default=None, help="CSV column / JSONL field holding the prompt (default: prompt)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (or pairs) of each file; with --benchmark, N prompts spread evenly over each set")
    p.add_argument("--benchmark", nargs="+", default=[], metavar="NAME",
                   help="built-in benchmarks to run: " + ", ".join(BUILTIN_BENCHMARK_NAMES))
    p.add_argument("--benchmark-file", nargs="+", type=Path, default=[], metavar="FILE",
                   help="your own benchmark: CSV/JSONL with a prompt column (prompt/goal/behavior), a kind column "
                        "(kind/label: harmful, benign, unsafe, safe) and optionally type and id")
    p.add_argument("--benchmark-kind", choices=["harmful", "benign"], default=None,
                   help="with --benchmark-file: the kind of every prompt of a file without a kind column")
    p.add_argument("--compare-to", default=None, metavar="DIR",
                   help="with --benchmark: a second model ('default' or a directory) answering the same prompts; "
                        "reports model - compare-to with McNemar's exact test and 95%% intervals")
    p.add_argument("--pairs", type=Path, default=None, help="hh-rlhf chosen/rejected pairs: report pairwise accuracy")
    p.add_argument("--split", choices=["all", "train", "heldout"], default="all",
                   help="with --pairs: which part of the fixed hh-rlhf split to use")
    p.add_argument("--principle", default=None, help="with --pairs: compare under this principle only")
    p.add_argument("--pair-kind", choices=["harmful", "benign", "detect"], default="harmful",
                   help="with --pairs: the prompts' kind (hh-rlhf harmless pairs are all red-team talks), "
                        "or detect it per prompt with the rules")
    p.add_argument("--constitution", type=Path, default=None, help="constitution YAML (default data/constitution.yaml)")
    p.add_argument("--evaluators", default="rules,harm_judge",
                   help="comma-separated evaluators to use: rules, classifier, harm_judge, judge, reward_model "
                        "(reward_model needs --reward-model)")
    p.add_argument("--refusal-classifier", default="default",
                   help="weights of the 3-class refusal classifier ('default': data/judges/refusal.npz; "
                        "'none': the rules' refusal regexes)")
    p.add_argument("--judge-model", default=None,
                   help="chat model for the judge evaluator ('default', or a directory); implies 'judge'")
    p.add_argument("--reward-model", default=None, help="a reward-model directory: report its mean score; with the reward_model evaluator it also judges")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit (default 64 with --benchmark, 128 for --prompts)")
    p.add_argument("--int8", action="store_true",
                   help="answer with an int8 copy of the model (CPU: ~2x faster decoding; answers differ "
                        "slightly from the fp32 model's, so compare models evaluated the same way)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    p.add_argument("--output", type=Path, default=None, help="folder for CSV/JSON/Markdown/PNG results")
    args = p.parse_args(argv)
    if args.pairs is None and not (args.prompts or args.benign or args.benchmark or args.benchmark_file):
        p.error("give --benchmark NAME / --benchmark-file FILE, --prompts and/or --benign prompt files, "
                "or --pairs for pairwise accuracy")
    unknown = [b for b in args.benchmark if b not in BUILTIN_BENCHMARK_NAMES]
    if unknown:
        p.error(f"--benchmark: unknown {unknown}; built in: {', '.join(BUILTIN_BENCHMARK_NAMES)} "
                "(your own set: --benchmark-file FILE)")
    if args.compare_to and not (args.benchmark or args.benchmark_file):
        p.error("--compare-to needs --benchmark or --benchmark-file")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    args.evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
    unknown = set(args.evaluators) - set(EVALUATOR_CHOICES)
    if unknown:
        p.error(f"--evaluators: unknown {sorted(unknown)}; choose from {', '.join(EVALUATOR_CHOICES)}")
    if args.judge_model and "judge" not in args.evaluators:
        args.evaluators.append("judge")
    if "judge" in args.evaluators and not args.judge_model:
        args.judge_model = args.model if args.pairs is None else "default"
    if "reward_model" in args.evaluators and not args.reward_model:
        p.error("--evaluators reward_model needs --reward-model DIR (a trained reward model)")
    return args


def load_policy(name, device):
    """'default', an HF directory, or a checkpoint directory (its policy/ model)."""
    from src.models import load_causal_lm
    from src.safety.constitutional.common.checkpoint import latest_checkpoint

    path = Path(name) if name != "default" else None
    if path is not None and not (path / "config.json").is_file():
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None and (checkpoint / "policy" / "config.json").is_file():
            path = checkpoint / "policy"
    model, tokenizer = load_causal_lm(path if path is not None else "default", device=device)
    model.eval()
    return model, tokenizer


def build_framework(args, judge=None):
    constitution = load_constitution(args.constitution)
    classifier = "default" if "classifier" in args.evaluators else None
    judge_model, judge_tokenizer = judge if judge is not None else (None, None)
    if "judge" in args.evaluators and judge_model is None:
        judge_model, judge_tokenizer = load_policy(args.judge_model, args.device)
    reward_model = None
    if "reward_model" in args.evaluators:
        from src.safety.constitutional.judging.evaluators.reward_model import RewardModelEvaluator
        reward_model = RewardModelEvaluator.load(args.reward_model, device=args.device)
    refusal = None if args.refusal_classifier in ("", "none") else args.refusal_classifier
    framework = ConstitutionalFramework(constitution, judge_model=judge_model, judge_tokenizer=judge_tokenizer,
                                        classifier=classifier, reward_model=reward_model,
                                        harm_judge="default" if "harm_judge" in args.evaluators else None,
                                        refusal_classifier=refusal, device=args.device)
    if "rules" not in args.evaluators:  # rules are the fallback for principles with nothing else
        framework.evaluators["rules"].weight = 1e-6
    return framework


def file_kind(path: Path, benign_files) -> str:
    if path in benign_files or "benign" in path.name.lower():
        return "benign"
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        kinds = {r.get("kind") for r in read_jsonl(path, skip_torn_tail=False)}
        if kinds == {"benign"}:
            return "benign"
    return "harmful"


def run_pairs(args) -> float:
    from tqdm.auto import tqdm

    from src.safety.constitutional.common.pairs import load_pairs

    pairs = load_pairs(args.pairs, limit=args.limit, split=None if args.split == "all" else args.split)
    framework = build_framework(args)
    probs = []
    chunk = 32
    for start in tqdm(range(0, len(pairs), chunk), desc="comparing pairs", unit="batch"):
        batch = pairs[start:start + chunk]
        comparisons = framework.compare_batch([p.prompt for p in batch], [p.chosen for p in batch],
                                              [p.rejected for p in batch], principle=args.principle,
                                              kinds=None if args.pair_kind == "detect" else args.pair_kind)
        probs += [c.prob_a_better for c in comparisons]
    correct = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs)
    accuracy = correct / len(probs)
    ties = sum(p == 0.5 for p in probs)
    print(f"{len(pairs)} pairs from {args.pairs} (split: {args.split}); evaluators: {', '.join(args.evaluators)}; "
          f"ties: {ties}")
    print(f"pairwise accuracy: {accuracy:.3f}")
    if args.output:
        atomic_write_json(Path(args.output) / "pairwise.json",
                          {"pairs": str(args.pairs), "split": args.split, "n": len(pairs), "accuracy": accuracy,
                           "ties": ties, "evaluators": args.evaluators, "principle": args.principle,
                           "prob_chosen_better": probs})
    return accuracy


def run_generation(args):
    from src.safety.constitutional.stages.evaluation import evaluate_model
    from src.safety.constitutional.training.generation import GenerationConfig

    files = list(args.prompts) + [f for f in args.benign if f not in args.prompts]
    prompt_sets = {}
    for path in files:
        try:
            prompts = read_prompts(path, args.column)[:args.limit]
        except ValueError:
            if args.column is None or ".csv" in path.suffixes:
                raise
            prompts = read_prompts(path)[:args.limit]  # --column names a CSV column; JSONL keeps `prompt`
        name = path.name.split(".")[0]
        prompt_sets[name] = (prompts, file_kind(path, args.benign))
        print(f"{name}: {len(prompts)} {prompt_sets[name][1]} prompts from {path}")
    start = time.time()
    model, tokenizer = load_policy(args.model, args.device)
    judge = (model, tokenizer) if "judge" in args.evaluators and args.judge_model == args.model else None
    framework = build_framework(args, judge)
    reward_model = None
    if "reward_model" in framework.evaluators:  # already loaded as an evaluator: score with the same one
        reward_model = framework.evaluators["reward_model"].reward_model
    elif args.reward_model:
        from src.models import RewardModel
        reward_model = RewardModel.from_pretrained(args.reward_model, device=args.device)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens or 128, do_sample=False, batch_size=args.batch_size)
    if args.int8:
        from src.models import int8_sampling_copy
        model = int8_sampling_copy(model)
    report = evaluate_model(model, tokenizer, prompt_sets, framework, config, reward_model=reward_model)
    print()
    print(report.to_text_table())
    print(f"\n({time.time() - start:.0f}s; model {args.model}; evaluators {', '.join(framework.evaluators)}; "
          "harmful compliance and over-refusal: lower is better)")
    if args.output:
        paths = report.write(args.output)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return report


def model_label(name: str, taken=()) -> str:
    label = "default" if name == "default" else (Path(name).name or str(name))
    return label if label not in taken else f"{label}-{len(taken) + 1}"


def run_benchmarks(args):
    """Each benchmark on --model (and --compare-to): answers, rates with intervals, paired comparison."""
    from src.safety.constitutional.stages.benchmarks import (benchmarks_markdown, default_benchmark_config, load_benchmark,
                                                             run_benchmark, write_comparison)

    benchmarks = [load_benchmark(name, limit=args.limit) for name in args.benchmark]
    benchmarks += [load_benchmark(path, limit=args.limit, kind=args.benchmark_kind) for path in args.benchmark_file]
    for bench in benchmarks:
        kinds = {k: bench.kinds.count(k) for k in ("harmful", "benign") if k in bench.kinds}
        print(f"{bench.name}: {len(bench)} prompts ({', '.join(f'{v} {k}' for k, v in kinds.items())}) from {bench.source}")
    gen = default_benchmark_config(args.max_new_tokens or 64, args.batch_size)
    start = time.time()
    names = ([args.compare_to] if args.compare_to else []) + [args.model]
    labels = []
    for name in names:
        labels.append(model_label(name, labels))
    results = {bench.name: {} for bench in benchmarks}
    framework = None
    for name, label in zip(names, labels):
        model, tokenizer = load_policy(name, args.device)
        if framework is None:  # one framework for every model: the same judge for both sides
            judge = (model, tokenizer) if "judge" in args.evaluators and args.judge_model == name else None
            framework = build_framework(args, judge)
        if args.int8:
            from src.models import int8_sampling_copy
            model = int8_sampling_copy(model)
        for bench in benchmarks:
            result = run_benchmark(model, tokenizer, bench, framework, gen, model_name=label)
            results[bench.name][label] = result
            if args.output:
                result.write(Path(args.output) / bench.name / label)
            print()
            print(result.to_markdown())
        del model
    if len(labels) > 1:
        print(benchmarks_markdown(results))
        if args.output:
            for bench_name, named in results.items():
                write_comparison(Path(args.output) / bench_name, bench_name, named)
    print(f"({time.time() - start:.0f}s; evaluators {', '.join(framework.evaluators)}; greedy, "
          f"{gen.max_new_tokens} new tokens{'; int8' if args.int8 else ''})")
    if args.output:
        print(f"wrote {args.output}/<benchmark>/<model>/answers.csv, summary.json, summary.md, plot.png")
    return results


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    from src.models import configure_threads
    configure_threads()  # $CAI_NUM_THREADS, else adaptive: the cores other processes leave free (src/models/threads.py)
    try:
        if args.pairs is not None:
            return run_pairs(args)
        out = run_benchmarks(args) if (args.benchmark or args.benchmark_file) else None
        if args.prompts or args.benign:
            out = run_generation(args)
        return out
    except (FileNotFoundError, ValueError) as err:  # bad inputs: one readable line, not a traceback
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
