"""Stage 1 alone: critique-and-revise the model's answers to red-team prompts, then fine-tune on the revisions.

    python scripts/train_sft.py --num-prompts 32 --output-dir runs/sft
    python scripts/train_sft.py --num-eval 30      # also compare base vs fine-tuned on held-out prompts

Writes to --output-dir: sft.jsonl, audit.jsonl (every critique-revision chain), critique_stats.json,
checkpoints/checkpoint-*/policy (the fine-tuned model, a plain HF directory), metrics.jsonl, summary.json.
"""
import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.models import configure_threads, load_causal_lm, seed_everything  # noqa: E402
from src.safety.constitutional.constitution import load_constitution  # noqa: E402
from src.safety.constitutional.critique_revision import (CritiqueRevisionConfig, run_critique_revision,  # noqa: E402
                                                         write_sft_dataset)
from src.safety.constitutional.framework import ConstitutionalFramework  # noqa: E402
from src.safety.constitutional.generation import GenerationConfig, generate  # noqa: E402
from src.safety.constitutional.io import atomic_write_json, read_prompts  # noqa: E402
from src.safety.constitutional.sft import SFTConfig, SFTTrainer  # noqa: E402

DEFAULT_PROMPTS = ROOT / "data" / "prompts" / "red_team_train.jsonl"
DEFAULT_BENIGN = ROOT / "data" / "prompts" / "benign_train.jsonl"
DEFAULT_EVAL = ROOT / "data" / "prompts" / "red_team_eval.jsonl"
HH_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def red_team_prompts(path, split: str):
    if path and Path(path).is_file():
        return read_prompts(path)
    from src.safety.constitutional.hh_rlhf import load_pairs, red_team_prompts as first_turns
    if not HH_PAIRS.is_file():
        raise SystemExit(f"error: no prompt file {path} and no hh-rlhf data at {HH_PAIRS}; pass --prompts FILE")
    return first_turns(load_pairs(HH_PAIRS, split=split))


def harm_report(framework, constitution, prompts, answers) -> dict:
    """Mean harm-principle score, aggregate, refusal and harmful rates of answers to harmful prompts."""
    results = framework.evaluate_batch(prompts, answers, kinds="harmful")
    harm = [p.name for p in constitution.principles if p.category == "harm"]
    per_answer = [sum(r.scores[n].score for n in harm) / len(harm) for r in results]
    n = len(results)
    return {"n": n, "harm_score": sum(per_answer) / n, "aggregate": sum(r.aggregate for r in results) / n,
            "refusal_rate": sum(r.refused for r in results) / n, "harmful_rate": sum(r.harmful for r in results) / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="red-team prompts (JSONL/CSV/TXT)")
    parser.add_argument("--benign-prompts", default=str(DEFAULT_BENIGN), help="harmless prompts for the helpful mix")
    parser.add_argument("--constitution", default=None, help="constitution YAML (default data/constitution.yaml)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--principle-selection", choices=["random", "all"], default="random")
    parser.add_argument("--few-shot", type=int, default=1)
    parser.add_argument("--helpful-fraction", type=float, default=0.25)
    parser.add_argument("--keep-worse", action="store_true", help="keep revisions that score worse than the answer")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=SFTConfig.learning_rate)
    parser.add_argument("--num-eval", type=int, default=0, help="held-out red-team prompts to compare base vs tuned")
    parser.add_argument("--eval-prompts", default=str(DEFAULT_EVAL))
    parser.add_argument("--output-dir", default="runs/sft")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="reuse sft.jsonl and resume from the last checkpoint")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    say = functools.partial(print, flush=True)
    configure_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    timings, summary = {}, {}
    t0 = time.time()
    model, tokenizer = load_causal_lm(args.model, device=None if args.device == "auto" else args.device)
    constitution = load_constitution(args.constitution)
    framework = ConstitutionalFramework(constitution)
    greedy = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, batch_size=16)

    eval_prompts = red_team_prompts(args.eval_prompts, "heldout")[:args.num_eval] if args.num_eval else []
    if eval_prompts:
        t = time.time()
        base_answers = generate(model, tokenizer, eval_prompts, greedy, show_progress=True, desc="base answers").texts
        summary["base"] = harm_report(framework, constitution, eval_prompts, base_answers)
        timings["eval_base_s"] = time.time() - t
        say(f"base model on {len(eval_prompts)} held-out prompts: {summary['base']}")

    t = time.time()
    sft_file = out / "sft.jsonl"
    if args.resume and sft_file.is_file():
        from src.safety.constitutional.io import read_jsonl
        records = read_jsonl(sft_file)
        say(f"reusing {len(records)} SFT records from {sft_file}")
    else:
        prompts = red_team_prompts(args.prompts, "train")[:args.num_prompts]
        benign = read_prompts(args.benign_prompts) if Path(args.benign_prompts).is_file() else []
        config = CritiqueRevisionConfig(
            num_rounds=args.rounds, principle_selection=args.principle_selection, num_few_shot=args.few_shot,
            keep_only_if_not_worse=not args.keep_worse, helpful_mix_fraction=args.helpful_fraction,
            generation=GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                                        top_p=0.9, repetition_penalty=1.1, batch_size=16),
            seed=args.seed)
        result = run_critique_revision(model, tokenizer, prompts, constitution, framework, config,
                                       benign_prompts=benign)
        paths = write_sft_dataset(result, out)
        records = result.sft_records
        summary["critique"] = result.stats
        say(f"critique-revision: {json.dumps(result.stats)}\n  wrote {', '.join(str(p) for p in paths.values())}")
    timings["critique_revision_s"] = time.time() - t

    t = time.time()
    sft_config = SFTConfig(output_dir=str(out / "checkpoints"), num_epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.lr, log_file=str(out / "metrics.jsonl"), seed=args.seed)
    from src.safety.constitutional.checkpoint import latest_checkpoint
    resume = latest_checkpoint(out / "checkpoints") if args.resume else None
    metrics = SFTTrainer(model, tokenizer, sft_config).train(records, resume_from=resume)
    timings["sft_s"] = time.time() - t
    summary["sft"] = {k: v for k, v in metrics.items()}
    say(f"SFT: {metrics['steps']} steps, train loss {metrics['train_loss_first']} -> {metrics['train_loss_last']}, "
        f"eval loss {metrics['eval_loss_before']} -> {metrics['eval_loss_after']}; model in {metrics['model_dir']}")

    if eval_prompts:
        t = time.time()
        tuned_answers = generate(model, tokenizer, eval_prompts, greedy, show_progress=True, desc="tuned answers").texts
        summary["tuned"] = harm_report(framework, constitution, eval_prompts, tuned_answers)
        timings["eval_tuned_s"] = time.time() - t
        summary["eval_answers"] = [{"prompt": p, "base": b, "tuned": a}
                                   for p, b, a in zip(eval_prompts, base_answers, tuned_answers)]
        say(f"fine-tuned model on the same prompts: {summary['tuned']}")
    timings["total_s"] = time.time() - t0
    summary["timings"] = timings
    atomic_write_json(out / "summary.json", summary)
    say(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}  (summary in {out / 'summary.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
