"""A short SFT / reward-model / PPO / DPO run on the tiny model, for tests/test_reliability.py.

`python tests/reliability_worker.py STAGE OUT_DIR [STEP_DELAY_S]` runs it in a process the test can
SIGKILL; `run(stage, out_dir)` runs the same thing in-process (uninterrupted, or resuming).
STEP_DELAY_S sleeps after every step so that the kill lands between checkpoints.
"""
import sys
import time
from pathlib import Path

import torch


from src.models import RewardModel, ValueModel, build_tiny_llama, load_tokenizer  # noqa: E402
from src.safety.constitutional.common.pairs import PreferencePair  # noqa: E402
from src.safety.constitutional.rl.dpo import DPOConfig, DPOTrainer  # noqa: E402
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer  # noqa: E402
from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig  # noqa: E402
from src.safety.constitutional.training.sft import SFTConfig, SFTTrainer  # noqa: E402

SFT_RECORDS = [{"prompt": f"Question {i}?", "response": f"Answer number {i}, politely."} for i in range(4)]
PAIRS = [PreferencePair([{"role": "user", "content": f"Question {i}?"}], f"yes {i}", f"no {i}") for i in range(8)]
PROMPTS = ["Say hi", "Name a colour.", "What is two plus two?", "Tell me a short joke about cats."]


def checkpoint_root(stage: str, out: Path) -> Path:
    return {"sft": out, "rm": out / "checkpoints", "ppo": out, "dpo": out}[stage]


def run(stage: str, out: Path, resume: bool = False, step_delay: float = 0.0, tokenizer=None):
    """Train; returns the trained model(s) whose weights the test compares."""
    tok = tokenizer or load_tokenizer("default")
    resume_from = checkpoint_root(stage, out) if resume else None
    if stage == "sft":
        model, _ = build_tiny_llama(tok, seed=0)
        trainer = SFTTrainer(model, tok, SFTConfig(output_dir=str(out), num_epochs=2, batch_size=2,
                                                   learning_rate=1e-3, checkpoint_every=1, keep_last=2,
                                                   eval_fraction=0.0, show_progress=False))
        _slow(trainer, "_train_step", step_delay)
        trainer.train(SFT_RECORDS, eval_records=[], resume_from=resume_from)
        return [model]
    if stage == "rm":
        lm, _ = build_tiny_llama(tok, seed=3)
        torch.manual_seed(4)
        rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
        trainer = RewardTrainer(rm, tok, RewardTrainerConfig(
            output_dir=str(out), batch_size=2, num_epochs=1, max_length=32, learning_rate=1e-3,
            eval_fraction=0.0, checkpoint_every=1, keep_checkpoints=2, show_progress=False, warmup_ratio=0.0,
            log_every=1))
        _slow(trainer, "_train_step", step_delay)
        trainer.train(PAIRS, resume_from=resume_from)
        return [rm]
    if stage == "ppo":
        policy, _ = build_tiny_llama(tok, seed=0)
        reward = RewardModel.from_causal_lm(build_tiny_llama(tok, seed=1)[0], device="cpu", head_init_std=0.5)
        value = ValueModel.from_causal_lm(policy, device="cpu")
        trainer = PPOTrainer(policy, value, reward, tok, "cpu", config=PPOConfig(
            learning_rate=1e-3, mini_batch_size=1, reward_normalization="running", adaptive_kl=True))
        _slow(trainer, "train_step", step_delay)
        torch.manual_seed(7)  # sampling; a resumed run takes its RNG state from the checkpoint
        trainer.train(PROMPTS, num_steps=4, batch_size=2, num_epochs_per_batch=1, max_length=3,
                      checkpoint_dir=out, checkpoint_freq=1, resume_from=resume_from, show_progress=False)
        return [trainer.policy, trainer.value_model]
    if stage == "dpo":
        policy, _ = build_tiny_llama(tok, seed=0)
        trainer = DPOTrainer(policy, tok, DPOConfig(batch_size=2, learning_rate=1e-3, checkpoint_dir=str(out),
                                                    checkpoint_every=1, lr_schedule="linear"))
        _slow(trainer, "train_step", step_delay)
        trainer.train(PAIRS, resume_from=resume_from, show_progress=False)
        return [trainer.policy]
    raise ValueError(f"unknown stage {stage!r}")


def _slow(obj, name: str, delay: float) -> None:
    if delay <= 0:
        return
    inner = getattr(obj, name)

    def slowed(*args, **kwargs):
        result = inner(*args, **kwargs)
        time.sleep(delay)
        return result
    setattr(obj, name, slowed)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], Path(sys.argv[2]), step_delay=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
