"""Stage 2 alone: a Bradley-Terry reward model on AI-labelled pairs (the constitution's), human pairs, or both.

    # human hh-rlhf pairs only, held-out accuracy on the 300 pairs never trained on
    python scripts/train_reward_model.py --human-only --pairs data/preferences/hh_rlhf_harmless_train.jsonl.gz \\
        --num-pairs 1498 --eval-pairs data/preferences/hh_rlhf_harmless_heldout.jsonl.gz --output-dir runs/rm
    # the default preset's stage 2 (AI pairs + 1,000 human pairs), from stage 1's model if this folder has one
    python scripts/train_reward_model.py --output-dir runs/mine

The same options as scripts/train_constitutional.py (preset, --config, --set reward.*; `--help` lists
them all) and the same run folder: stage2_reward/ holds pairs.jsonl, checkpoints/, metrics.jsonl,
stage.json (accuracies) and model/. To measure an existing reward model on any pairs file:
`python scripts/measure_evaluators.py --pairs FILE --evaluators reward_model --reward-model DIR`.
"""
import sys

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

from src.safety.constitutional.cli import Shortcut, main  # noqa: E402

SHORTCUTS = (
    Shortcut("--pairs", "data.human_pairs", "human preference pairs (hh-rlhf JSONL, gzip ok; its first 1,500 records)"),
    Shortcut("--num-pairs", "data.num_human_pairs", "how many of those human pairs"),
    Shortcut("--human-only", "data.num_preference_prompts", "train on the human pairs only, no AI-labelled pairs",
             const="0"),
    Shortcut("--eval-pairs", "data.reward_eval_pairs", "human pairs never trained on: held-out accuracy"),
    Shortcut("--keep-layers", "reward.keep_layers", "build the reward model on the bottom K layers"),
)

if __name__ == "__main__":
    sys.exit(main(description=__doc__, stages=("reward",), shortcuts=SHORTCUTS))
