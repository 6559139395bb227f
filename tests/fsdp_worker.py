"""One rank of the FSDP2 test in tests/test_distributed.py (run under torch.distributed.run, gloo on CPU).

    fsdp_worker.py OUT fsdp        SFT (4 steps, a sharded checkpoint after each), a reward model
                                   (2 steps) and DPO (2 steps), all on FSDP2; writes OUT/fsdp_rank<r>.pt
    fsdp_worker.py OUT fsdp_kill   the same SFT run, killed (SIGKILL, every rank) right after the
                                   checkpoint of step 2: the test resumes it on one process

Rank r builds its models with seed r, so the ranks only agree if the trainers broadcast rank 0's weights.
"""
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch

from src.models import RewardModel, build_tiny_llama, load_tokenizer  # noqa: E402
from src.safety.constitutional.common import distributed as ddp  # noqa: E402
from src.safety.constitutional.rl.dpo import DPOTrainer  # noqa: E402
from src.safety.constitutional.training.loop import TrainingLoop  # noqa: E402
from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig  # noqa: E402
from src.safety.constitutional.training.sft import SFTConfig, SFTTrainer  # noqa: E402


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).clone()


def sft_records(n=8):
    return [{"prompt": f"Question {i}?", "response": f"Answer number {i} is yes, {i} times."} for i in range(n)]


def sft_config(out: Path, distributed: str = "fsdp") -> SFTConfig:
    return SFTConfig(output_dir=str(out), num_epochs=2, batch_size=4, learning_rate=1e-3, eval_fraction=0.0,
                     checkpoint_every=1, keep_last=10, warmup_ratio=0.0, max_seq_len=64, show_progress=False,
                     distributed=distributed)


def rm_config(out: Path, distributed: str = "fsdp") -> RewardTrainerConfig:
    return RewardTrainerConfig(output_dir=str(out), batch_size=4, num_epochs=1, max_length=32, learning_rate=1e-3,
                               eval_fraction=0.0, show_progress=False, warmup_ratio=0.0, distributed=distributed)


def main(out: Path, mode: str) -> None:
    assert ddp.init_distributed(), "expected WORLD_SIZE=2 from torchrun"
    tok = load_tokenizer("default")
    r = ddp.rank()
    model, _ = build_tiny_llama(tok, seed=40 + r)
    trainer = SFTTrainer(model, tok, sft_config(out / ("sft_kill" if mode == "fsdp_kill" else "sft")))
    if mode == "fsdp_kill":
        save = TrainingLoop.save

        def save_then_die(self, *args, **kwargs):
            path = save(self, *args, **kwargs)
            if self.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        TrainingLoop.save = save_then_die
    metrics = trainer.train(sft_records())
    result = {"rank": r, "sft": flat(trainer.model), "sft_loss": metrics["train_loss"],
              "sft_plain": all(type(p) is torch.nn.Parameter for p in trainer.model.parameters())}

    lm, _ = build_tiny_llama(tok, seed=10 + r)
    rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
    from distributed_worker import toy_pairs
    rm_trainer = RewardTrainer(rm, tok, rm_config(out / "rm"))
    rm_trainer.train(toy_pairs(8))
    result["rm"] = flat(rm_trainer.model)
    result["rm_stats"] = list(rm_trainer.model.reward_stats or ())

    from distributed_worker import dpo_config
    policy, _ = build_tiny_llama(tok, seed=30 + r)
    dpo = DPOTrainer(policy, tok, dataclasses.replace(dpo_config(out), distributed="fsdp"))
    result["dpo_loss"] = [h["loss"] for h in dpo.train(toy_pairs(8), show_progress=False)["history"]]
    result["dpo"] = flat(dpo.policy)
    torch.save(result, out / f"fsdp_rank{r}.pt")
    ddp.destroy_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share the cores
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(Path(sys.argv[1]), sys.argv[2])
