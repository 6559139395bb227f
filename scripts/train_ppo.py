"""Stage 3 alone: PPO (or GRPO, RLOO, REINFORCE, DPO) of a policy against a reward model.

    python scripts/train_ppo.py --policy default --reward-model runs/rm/stage2_reward/model \\
        --prompts prompts.txt --steps 20 --output-dir runs/ppo
    python scripts/train_ppo.py --output-dir runs/mine                # after train_sft.py / train_reward_model.py
    python scripts/train_ppo.py ... --rl-algorithm grpo --set rl.grpo.group_size=4

The same options as scripts/train_constitutional.py (preset, --config, --set rl.ppo.*; `--help` lists
them all) and the same run folder: stage3_rl/ holds checkpoints/ (rerun the same command to resume),
metrics.jsonl (one line per step), stage.json and model/ (the final policy, a plain HF folder).
"""
import sys

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.safety.constitutional.cli import Shortcut, main  # noqa: E402

SHORTCUTS = (
    Shortcut("--policy", "model", "the policy to train: 'default' or a local HF folder (when this run folder has no "
                                  "stage-1 model)"),
    Shortcut("--prompts", "data.train_prompts", "prompts for rollouts (JSONL `prompt`, CSV `prompt` column or TXT)"),
    Shortcut("--steps", "rl.steps", "RL steps"),
    Shortcut("--evaluate", "stages", "then evaluate the base and trained models", const="[rl, evaluate]"),
)

if __name__ == "__main__":
    sys.exit(main(description=__doc__, stages=("rl",), shortcuts=SHORTCUTS))
