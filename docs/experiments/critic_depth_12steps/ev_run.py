"""Critic comparison on the default model: full-depth vs truncated critic, same everything else
(docs/performance.md, "PPO: fewer FLOPs per iteration"). Run from the repository root:

    PYTHONPATH=. CAI_NUM_THREADS=1 python docs/experiments/critic_depth_12steps/ev_run.py rm OUT_RM
    PYTHONPATH=. CAI_NUM_THREADS=1 python docs/experiments/critic_depth_12steps/ev_run.py ppo OUT_RM 0 12 full.jsonl
    PYTHONPATH=. CAI_NUM_THREADS=1 python docs/experiments/critic_depth_12steps/ev_run.py ppo OUT_RM 8 12 k8.jsonl

`rm`: a reward model on the bottom 8 layers, head + final norm fitted on 256 hh-rlhf harmless train
pairs (4 epochs, lr 1e-3, max 96 tokens; held-out accuracy 0.68 on its 25 eval pairs). `ppo`: 12 PPO
steps, KEEP = value_keep_layers (0: full depth). (As run, ROOT was this worktree's absolute path.)
"""
import json, sys, time
from pathlib import Path

import torch
from src.models import RewardModel, load_causal_lm, load_tokenizer, configure_threads
from src.safety.constitutional.common.pairs import load_pairs
from src.safety.constitutional.common.io import read_prompts

configure_threads(1)
ROOT = str(Path(__file__).resolve().parents[3])
if sys.argv[1] == "rm":
    from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig
    tok = load_tokenizer("default")
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm("default", device="cpu", keep_layers=8, pad_token_id=tok.pad_token_id)
    pairs = load_pairs(f"{ROOT}/../shared/data/hh-rlhf-harmless/pairs.jsonl.gz", limit=256, split="train")
    cfg = RewardTrainerConfig(output_dir=sys.argv[2] + "_ckpt", trainable_layers=0, learning_rate=1e-3,
                              num_epochs=4, batch_size=16, max_length=96, show_progress=False)
    t0 = time.time()
    print(RewardTrainer(rm, tok, cfg).train(pairs), time.time() - t0)
    rm.save_pretrained(sys.argv[2], tokenizer=tok)
else:
    from src.safety.constitutional.ppo_trainer import PPOConfig, PPOTrainer
    rm_dir, keep, steps, log = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    policy, tok = load_causal_lm("default", device="cpu")
    rm = RewardModel.from_pretrained(rm_dir, device="cpu")
    prompts = read_prompts(f"{ROOT}/data/prompts/red_team_train.jsonl")[:64]
    cfg = PPOConfig(learning_rate=1e-5, value_learning_rate=1e-4, mini_batch_size=4, kl_penalty=0.05,
                    early_stop_kl=0.05, value_keep_layers=keep or None, old_values_from_update=True,
                    log_file=log, seed=0)
    torch.manual_seed(0)
    trainer = PPOTrainer(policy, None, rm, tok, "cpu", config=cfg)
    torch.manual_seed(1)
    out = trainer.train(prompts, num_steps=steps, batch_size=8, num_epochs_per_batch=2, max_length=32,
                        show_progress=False)
    print(json.dumps(out["final_stats"]))
