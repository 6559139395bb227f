"""One rank of the 2-process test in tests/test_distributed.py (run under torch.distributed.run).

Rank r builds its models with seed r, so the ranks only agree if the trainers broadcast rank 0's
weights at the start; it then trains a reward model (2 steps, DDP), SFT (2 steps, DDP, gradient
accumulation), a reward model with a NaN loss on rank 1 only (DDP), PPO (2 steps, DDP, sampled
answers; then resumed from its step-1 checkpoint) and DPO (2 steps, DDP) and writes its flattened
weights to <out>/rank<r>.pt for the test to compare.
"""

import dataclasses
import sys
from pathlib import Path

import torch


from src.models import RewardModel, ValueModel, build_tiny_llama, load_tokenizer  # noqa: E402
from src.safety.constitutional.common import distributed as ddp  # noqa: E402
from src.safety.constitutional.common.pairs import PreferencePair  # noqa: E402
from src.safety.constitutional.rl.dpo import DPOConfig, DPOTrainer  # noqa: E402
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer  # noqa: E402
from src.safety.constitutional.training import reward_training  # noqa: E402
from src.safety.constitutional.training.generation import GenerationConfig, generate, sharded_across_ranks  # noqa: E402
from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig  # noqa: E402
from src.safety.constitutional.training.sft import SFTConfig, SFTTrainer  # noqa: E402

PROMPTS = ["Say hi", "Name a colour.", "What is two plus two?", "Tell me a short joke about cats."]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).clone()


def toy_pairs(n):
    return [PreferencePair([{"role": "user", "content": f"Question {i}?"}], f"yes {i}", f"no {i}") for i in range(n)]


def rm_config(out: Path) -> RewardTrainerConfig:
    return RewardTrainerConfig(output_dir=str(out / "rm"), batch_size=4, num_epochs=1, max_length=32,
                               learning_rate=1e-3, eval_fraction=0.0, show_progress=False, log_every=1,
                               warmup_ratio=0.0)


def sft_records(n):
    return [{"prompt": f"Question {i}?", "response": f"Answer number {i} is yes, {i} times."} for i in range(n)]


def sft_config(out: Path) -> SFTConfig:
    # 9 records in batches of 4, 2 micro-batches per step: step 1 accumulates (no_sync on the first
    # backward), step 2 has one record, so rank 1 runs a zero-weighted forward and backward
    return SFTConfig(output_dir=str(out / "sft"), num_epochs=1, batch_size=4, grad_accum_steps=2, learning_rate=1e-3,
                     eval_fraction=0.0, warmup_ratio=0.0, max_seq_len=64, show_progress=False)


def dpo_config(out: Path) -> DPOConfig:
    return DPOConfig(batch_size=4, max_steps=2, learning_rate=1e-3, checkpoint_dir=str(out / "dpo"),
                     checkpoint_every=1)


def main(out: Path) -> None:
    assert ddp.init_distributed(), "expected WORLD_SIZE=2 from torchrun"  # (the trainers would also join)
    tok = load_tokenizer("default")
    r = ddp.rank()

    # -- reward model: rank r starts from seed r; the trainer's broadcast must make them equal
    lm, _ = build_tiny_llama(tok, seed=10 + r)
    rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
    trainer = RewardTrainer(rm, tok, rm_config(out))
    rm_start = flat(rm)
    trainer.train(toy_pairs(8))  # 2 steps of 4 pairs, 2 per rank
    rm_after = flat(rm)
    rm_mode = trainer.parallel.mode

    # -- SFT on DDP
    sft_model, _ = build_tiny_llama(tok, seed=50 + r)
    sft = SFTTrainer(sft_model, tok, sft_config(out))
    sft_start = flat(sft_model)
    sft_loss = sft.train(sft_records(9))["train_loss"]
    sft_mode = sft.parallel.mode

    # -- a NaN loss on rank 1 only, at the first step: both ranks skip it (no rank waits in a collective)
    lm, _ = build_tiny_llama(tok, seed=60 + r)
    bad_rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
    real_loss, calls = reward_training.bradley_terry_loss, []

    def nan_once_on_rank1(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if r == 1 and len(calls) == 1 else loss
    reward_training.bradley_terry_loss = nan_once_on_rank1
    bad = RewardTrainer(bad_rm, tok, dataclasses.replace(rm_config(out / "bad"), max_bad_steps=1))
    bad_start = flat(bad_rm)
    bad.train(toy_pairs(8))
    reward_training.bradley_terry_loss = real_loss

    # -- PPO: 2 steps, 2 prompts per step (1 per rank)
    policy, _ = build_tiny_llama(tok, seed=20 + r)
    reward = RewardModel.from_causal_lm(build_tiny_llama(tok, seed=1)[0], device="cpu", head_init_std=0.5)
    value = ValueModel.from_causal_lm(policy, device="cpu")
    ppo = PPOTrainer(policy, value, reward, tok, "cpu",
                     config=PPOConfig(learning_rate=1e-3, mini_batch_size=1, reward_normalization="running"))
    ppo_start = flat(ppo.policy)
    result = ppo.train(PROMPTS, num_steps=2, batch_size=2, num_epochs_per_batch=1, max_length=4,
                       checkpoint_dir=out / "ppo", checkpoint_freq=1, show_progress=False)
    # -- PPO resumed on both ranks from its step-1 checkpoint (same initial weights: the reference is the
    # initial policy); sampling included, it must end where the uninterrupted run ended
    policy, _ = build_tiny_llama(tok, seed=20 + r)
    resumed = PPOTrainer(policy, ValueModel.from_causal_lm(policy, device="cpu"), reward, tok, "cpu",
                         config=PPOConfig(learning_rate=1e-3, mini_batch_size=1, reward_normalization="running"))
    resumed.train(PROMPTS, num_steps=2, batch_size=2, num_epochs_per_batch=1, max_length=4,
                  resume_from=out / "ppo" / "checkpoint-000001", checkpoint_freq=0, show_progress=False)
    # -- DPO: 2 steps of 4 pairs, 2 per rank
    dpo_policy, _ = build_tiny_llama(tok, seed=30 + r)
    dpo = DPOTrainer(dpo_policy, tok, dpo_config(out))
    dpo_start = flat(dpo.policy)
    dpo_result = dpo.train(toy_pairs(8), show_progress=False)
    # -- sampled generation split over the ranks: 5 prompts in batches of 2 (rank 0 takes 2 batches)
    import src.safety.constitutional.training.generation as generation
    batches, answer_batch = [], generation._answer_batch
    generation._answer_batch = lambda *a, **k: batches.append(1) or answer_batch(*a, **k)
    torch.manual_seed(5)
    with sharded_across_ranks():
        sampled = generate(dpo.policy, tok, PROMPTS + ["Count to three."],
                           GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, batch_size=2)).texts
    generation._answer_batch = answer_batch
    rng_after = torch.rand(3)
    torch.save({"rank": r, "world_size": ddp.world_size(), "rm_start": rm_start, "rm_after": rm_after,
                "modes": [rm_mode, sft_mode, dpo.parallel.mode],
                "sft_start": sft_start, "sft_after": flat(sft.model), "sft_loss": sft_loss,
                "bad_start": bad_start, "bad_after": flat(bad_rm), "bad_skipped": bad.bad_steps,
                "sampled": sampled, "rng_after": rng_after, "batches": len(batches),
                "dpo_start": dpo_start, "dpo_after": flat(dpo.policy),
                "dpo_loss": [h["loss"] for h in dpo_result["history"]],
                "ppo_start": ppo_start, "ppo_policy": flat(ppo.policy), "ppo_value": flat(ppo.value_model),
                "ppo_ref": flat(ppo.ref_model),
                "ppo_resumed": [flat(resumed.policy), flat(resumed.value_model)],
                "ppo_scores": [h["mean_score"] for h in result["history"]],
                "reward_stats": [ppo.reward_stats.mean, ppo.reward_stats.std]},
               out / f"rank{r}.pt")
    ddp.destroy_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share the cores
    main(Path(sys.argv[1]))
