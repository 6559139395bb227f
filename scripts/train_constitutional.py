"""Run the whole Constitutional-AI pipeline: critique-revise SFT, AI-feedback reward model, RL, evaluation.

Examples:
  python scripts/train_constitutional.py                       # default preset, default model, CPU ok
  python scripts/train_constitutional.py --preset smoke        # tiny model, seconds
  python scripts/train_constitutional.py --model path/to/hf_model --output-dir runs/mine --set rl.steps=40
  python scripts/train_constitutional.py --stages evaluate     # only (re)evaluate an existing run
  python scripts/train_constitutional.py --preset full --judge-model path/to/7b-instruct   # a strong judge (GPU)

Rerunning the same command skips finished stages and resumes an interrupted one from its last checkpoint.
One stage alone, with the same options: scripts/train_sft.py, train_reward_model.py, train_ppo.py.
"""
import sys

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.safety.constitutional.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
