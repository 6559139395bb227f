"""One rank of the online-RL DDP test in tests/test_distributed.py (run under torch.distributed.run, gloo).

PPO (policy and critic on DDP) and GRPO (policy on DDP) train 3 steps on 2 prompts, one prompt per
rank. The answers come from `fixed_answers`, a stand-in for sampling that gives every (prompt, k-th
answer to it) the same tokens however the batch is split over ranks, so the run can be compared with
one process on the same global batch (real sampling draws from each rank's own stream: different
answers by design). Then PPO resumes from its step-2 checkpoint on both ranks and must end where
the uninterrupted run ended. Rank r builds its models with seed r: the trainers broadcast rank 0's.
Writes <out>/rl_rank<r>.pt.
"""

import sys
import zlib
from pathlib import Path

import torch

from src.models import RewardModel, ValueModel, build_tiny_llama, load_tokenizer  # noqa: E402
from src.safety.constitutional.common import distributed as ddp  # noqa: E402
from src.safety.constitutional.rl import rollout as rl_rollout  # noqa: E402
from src.safety.constitutional.rl.policy_gradient import GRPOConfig, GRPOTrainer  # noqa: E402
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer  # noqa: E402
from src.safety.constitutional.training.generation import GenerationOutput, tokenize_prompts  # noqa: E402
from src.safety.constitutional.training.logprobs import sequence_logprobs  # noqa: E402

PROMPTS = ["Question one?", "Question two?"]  # batch_size 2: every step trains on both (1 per rank)
ANSWER_TOKENS = 4
STEPS = 3


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).clone()


def fixed_answers(model, tokenizer, prompts, config, return_logprobs=True):
    """`generation.generate` without sampling: the j-th answer to a prompt in a batch is ANSWER_TOKENS
    tokens seeded by (prompt, j), never end-of-turn; log-probs from the one log-prob path."""
    device = next(model.parameters()).device
    p_ids, p_mask, texts = tokenize_prompts(tokenizer, prompts, config, device)
    seen, rows = {}, []
    for prompt in prompts:
        j = seen[str(prompt)] = seen.get(str(prompt), -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}".encode()))
        rows.append(torch.randint(300, 3000, (ANSWER_TOKENS,), generator=g))
    r_ids = torch.stack(rows).to(device)
    r_mask = torch.ones_like(r_ids)
    with torch.no_grad():
        logprobs = sequence_logprobs(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1),
                                     ANSWER_TOKENS, config.temperature)
    return GenerationOutput(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids, response_mask=r_mask,
                            texts=tokenizer.batch_decode(r_ids, skip_special_tokens=True),
                            finished=torch.zeros(len(prompts), dtype=torch.bool, device=device),
                            logprobs=logprobs, prompt_texts=texts)


def reward_model(tok):
    return RewardModel.from_causal_lm(build_tiny_llama(tok, seed=1)[0], device="cpu", head_init_std=0.5)


def ppo_trainer(tok, seed: int) -> PPOTrainer:
    policy, _ = build_tiny_llama(tok, seed=seed)
    value = ValueModel.from_causal_lm(policy, device="cpu")
    # whitening is per rank (each rank's own answers), so it is off for the comparison with one process
    config = PPOConfig(learning_rate=1e-3, whiten_advantages=False, reward_normalization="running")
    return PPOTrainer(policy, value, reward_model(tok), tok, "cpu", config=config)


def grpo_trainer(tok, seed: int) -> GRPOTrainer:
    policy, _ = build_tiny_llama(tok, seed=seed)
    return GRPOTrainer(policy, reward_model(tok), tok, "cpu",
                       config=GRPOConfig(learning_rate=1e-3, group_size=2, reward_normalization="running"))


def train(trainer, out=None, resume_from=None):
    return trainer.train(PROMPTS, num_steps=STEPS, batch_size=2, num_epochs_per_batch=2, max_length=ANSWER_TOKENS,
                         checkpoint_dir=out, checkpoint_freq=1 if out is not None else 0, resume_from=resume_from,
                         show_progress=False)


def main(out: Path) -> None:
    assert ddp.init_distributed(), "expected WORLD_SIZE=2 from torchrun"
    rl_rollout.generate = fixed_answers
    tok = load_tokenizer("default")
    r = ddp.rank()

    ppo = ppo_trainer(tok, seed=70 + r)
    ppo_start = flat(ppo.policy)
    ppo_history = train(ppo, out / "ppo")["history"]
    # the same initial weights (the frozen reference is the initial policy, not checkpointed while it does
    # not move); the checkpoint replaces the policy, critic, optimisers, statistics and sampler
    resumed = ppo_trainer(tok, seed=70 + r)
    train(resumed, resume_from=out / "ppo" / "checkpoint-000002")

    grpo = grpo_trainer(tok, seed=80 + r)
    grpo_start = flat(grpo.policy)
    grpo_history = train(grpo)["history"]

    torch.save({"rank": r, "modes": [ppo.policy_parallel.mode, ppo.value_parallel.mode, grpo.policy_parallel.mode],
                "ppo_start": ppo_start, "ppo_policy": flat(ppo.policy), "ppo_value": flat(ppo.value_model),
                "ppo_resumed_policy": flat(resumed.policy), "ppo_resumed_value": flat(resumed.value_model),
                "ppo_scores": [h["mean_score"] for h in ppo_history],
                "ppo_skipped": [h["skipped_updates"] for h in ppo_history],
                "grpo_start": grpo_start, "grpo_policy": flat(grpo.policy),
                "grpo_skipped": [h["skipped_updates"] for h in grpo_history]},
               out / f"rl_rank{r}.pt")
    ddp.destroy_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share the cores
    main(Path(sys.argv[1]))
