#!/usr/bin/env python
"""PPO on a prompt file with a trained reward model.

    python scripts/train_ppo.py --policy default --reward-model runs/reward/model \
        --prompts prompts.txt --steps 20 --batch-size 8 --output-dir runs/ppo
    python scripts/train_ppo.py ... --resume            # continue from the newest checkpoint

Writes <output-dir>/checkpoints/checkpoint-*/ (policy/, value/, trainer state), metrics.jsonl (one
line per step), model/ (the final policy, HF format) and summary.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.models import RewardModel, ValueModel, configure_threads, load_causal_lm, resolve_device, seed_everything  # noqa: E402
from src.safety.constitutional.checkpoint import latest_checkpoint  # noqa: E402
from src.safety.constitutional.io import atomic_write_json, read_prompts  # noqa: E402
from src.models.lora import merge_lora  # noqa: E402
from src.safety.constitutional.ppo_trainer import PPOConfig, PPOTrainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="default", help="'default' (SmolLM2-135M-Instruct) or a HF model directory")
    p.add_argument("--reward-model", required=True, help="directory of a RewardModel (save_pretrained)")
    p.add_argument("--prompts", required=True, help="prompt file: .txt (a line each), .jsonl or .csv (field 'prompt')")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs per rollout batch")
    p.add_argument("--mini-batch-size", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--value-lr", type=float, default=None)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "k3", "abs", "mse"])
    p.add_argument("--adaptive-kl", action="store_true")
    p.add_argument("--target-kl", type=float, default=6.0)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--early-stop-kl", type=float, default=None,
                   help="stop a step's update epochs once approx KL(old||new) exceeds this (e.g. 0.02)")
    p.add_argument("--missing-eos-penalty", type=float, default=None)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--checkpoint-freq", type=int, default=5)
    p.add_argument("--share-reward-reference", action="store_true",
                   help="one frozen backbone for reward and reference (reward model trained head-only)")
    p.add_argument("--offload-frozen", action="store_true", help="keep reference and reward model on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank for the policy (0: full fine-tuning; the "
                   "reference is then the policy with its adapters off, not a copy)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configure_threads(args.threads)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    out = Path(args.output_dir)
    checkpoints = out / "checkpoints"
    resume = latest_checkpoint(checkpoints) if args.resume else None
    if args.resume and resume is None:
        logging.warning("--resume: no complete checkpoint in %s; starting from scratch", checkpoints)
    if not args.resume and latest_checkpoint(checkpoints) is not None:
        raise SystemExit(f"{checkpoints} already holds checkpoints: pass --resume to continue, "
                         "or choose another --output-dir")

    prompts = read_prompts(args.prompts)
    policy, tokenizer = load_causal_lm(args.policy, device=device)
    reward = RewardModel.from_pretrained(args.reward_model, device="cpu" if args.offload_frozen else device)
    value = ValueModel.from_causal_lm(policy, device=device)
    config = PPOConfig(learning_rate=args.lr, value_learning_rate=args.value_lr, kl_penalty=args.kl_coef,
                       kl_estimator=args.kl_estimator, adaptive_kl=args.adaptive_kl, target_kl=args.target_kl,
                       gamma=args.gamma, early_stop_kl=args.early_stop_kl, mini_batch_size=args.mini_batch_size,
                       missing_eos_penalty=args.missing_eos_penalty, max_prompt_tokens=args.max_prompt_tokens,
                       share_reward_and_reference=args.share_reward_reference,
                       offload_frozen_to_cpu=args.offload_frozen, gradient_checkpointing=args.gradient_checkpointing,
                       lora_r=args.lora_r, lora_alpha=args.lora_alpha, seed=args.seed, log_file=str(out / "metrics.jsonl"))
    trainer = PPOTrainer(policy, value, reward, tokenizer, device, config=config)
    print(f"PPO: {len(prompts)} prompts, {args.steps} steps x {args.batch_size} answers of <= "
          f"{args.max_new_tokens} tokens on {device}" + (f", resuming from {resume}" if resume else ""), flush=True)
    start = time.perf_counter()
    result = trainer.train(prompts, num_steps=args.steps, batch_size=args.batch_size, num_epochs_per_batch=args.epochs,
                           max_length=args.max_new_tokens, temperature=args.temperature,
                           checkpoint_dir=checkpoints, checkpoint_freq=args.checkpoint_freq, resume_from=resume)
    merge_lora(policy).save_pretrained(out / "model")  # adapters folded in: a plain HF model
    tokenizer.save_pretrained(out / "model")
    history = result["history"]
    head, tail = history[:5], history[-5:]

    def avg(rows, key):
        return sum(r[key] for r in rows) / max(1, len(rows))
    summary = {"final_stats": result["final_stats"], "steps": len(history),
               "first5_score": avg(head, "mean_score"), "last5_score": avg(tail, "mean_score"),
               "first5_kl": avg(head, "kl_divergence"), "last5_kl": avg(tail, "kl_divergence"),
               "seconds_per_step": avg(history, "time_step_s"), "wall_seconds_this_run": time.perf_counter() - start}
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
