"""Stage 1 alone: critique-and-revise the model's answers to red-team prompts, then fine-tune on the revisions.

    python scripts/train_sft.py --output-dir runs/mine                       # the default preset's stage 1
    python scripts/train_sft.py --prompts my_red_team.jsonl --num-prompts 32 --set sft.num_epochs=1
    python scripts/train_sft.py --output-dir runs/mine --evaluate            # then base vs fine-tuned on held-out prompts

The same options as scripts/train_constitutional.py (preset, --config, --set; `--help` lists them all),
and the same run folder: stage1_sft/ holds sft.jsonl, audit.jsonl (every critique-revision chain),
critique_stats.json, checkpoints/, metrics.jsonl and model/ (a plain HF folder). Run
scripts/train_reward_model.py and scripts/train_ppo.py with the same --output-dir to go on from it.
"""
import sys

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.safety.constitutional.cli import Shortcut, main  # noqa: E402

SHORTCUTS = (
    Shortcut("--prompts", "data.train_prompts", "red-team prompts (JSONL `prompt`, CSV `prompt` column or TXT)"),
    Shortcut("--benign-prompts", "data.benign_train_prompts", "harmless prompts for the helpful mix-in"),
    Shortcut("--num-prompts", "data.num_sft_prompts", "red-team prompts through critique-revision"),
    Shortcut("--evaluate", "stages", "then evaluate the base and fine-tuned models", const="[sft, evaluate]"),
)

if __name__ == "__main__":
    sys.exit(main(description=__doc__, stages=("sft",), shortcuts=SHORTCUTS))
