"""Data parallelism under torchrun: 2 CPU processes (gloo) stay in sync through SFT, RM, DPO, PPO and GRPO
training (DDP) and FSDP2 (SFT, reward model, DPO; sharded checkpoints, resume on 1 process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.models import RewardModel, build_tiny_llama
from src.safety.constitutional.common import distributed as ddp
from src.safety.constitutional.common import parallel
from src.safety.constitutional.rl.dpo import DPOTrainer
from src.safety.constitutional.training.reward_training import RewardTrainer
from src.safety.constitutional.training.sft import SFTTrainer

ROOT = Path(__file__).resolve().parents[1]


def torchrun_worker(worker: str, *args, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 tests/<worker> ARGS` on gloo, one thread each; with `check`, fails
    the test with the workers' stderr if they fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAI_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / worker), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc
import distributed_worker as worker  # noqa: E402
import rl_ddp_worker  # noqa: E402
import fsdp_worker  # noqa: E402

# Two ranks each averaging half-batch gradients vs one process on the whole batch: the summation order
# differs, so a parameter whose gradient is near Adam's eps can move by a visibly different fraction of
# lr (1e-3). Measured here (CPU, gloo, torch 2.13; `pytest -s` prints them): DDP reward model 1.5e-5 max,
# SFT 1.4e-6, DPO 1.3e-6, PPO policy 1.5e-6 and critic 6.0e-6, GRPO 4.8e-6 (3 steps of 2 epochs, fixed answers);
# FSDP2 SFT 1.2e-7 (also resumed on 1 process), reward model 1.5e-5, DPO 1.3e-6; no entry over 2e-5.
# Allowed: 2e-4 max, at most 10 entries over 2e-5.
def assert_close_to_one_process(single: torch.Tensor, two: torch.Tensor, what: str) -> None:
    diff = (single - two).abs()
    print(f"{what}: one process vs 2 ranks, max |diff| {diff.max().item():.3g}, "
          f"{int((diff > 2e-5).sum())} of {diff.numel()} entries over 2e-5")
    assert diff.max() < 2e-4 and (diff > 2e-5).sum() <= 10, (what, diff.max(), (diff > 2e-5).sum())


def test_single_process_helpers_are_no_ops(tiny_model):
    assert not ddp.is_initialized() and ddp.world_size() == 1 and ddp.rank() == 0 and ddp.is_main_process()
    assert ddp.shard([1, 2, 3]) == [1, 2, 3]
    assert ddp.all_reduce_mean(2.5) == 2.5 and ddp.all_true(True) and not ddp.all_true(False)
    assert ddp.sampling_seed(7) == 7
    ddp.barrier()
    ddp.broadcast_model(tiny_model)
    assert not hasattr(ddp, "sync_gradients")  # the engines average the gradients (parallel.py)


def test_shard_splits_deterministically_in_blocks(monkeypatch):
    monkeypatch.setattr(ddp, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(ddp, "rank", lambda r=r: r)
        shares.append(ddp.shard(list(range(7))))
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    monkeypatch.setattr(ddp, "rank", lambda: 2)
    assert ddp.shard([0, 1]) == []  # fewer items than ranks: an empty share


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_match_one_process(tokenizer, tmp_path):
    torchrun_worker("distributed_worker.py", tmp_path, timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)

    assert r0["modes"] == ["ddp", "ddp", "ddp"]  # reward model, SFT, DPO: DistributedDataParallel by default
    # identical weights on both ranks (they were built from different seeds: broadcast at start)
    for key in ("rm_start", "rm_after", "ppo_start", "ppo_policy", "ppo_value", "ppo_ref", "sft_start", "sft_after",
                "bad_start", "bad_after"):
        assert torch.equal(r0[key], r1[key]), key
    # a NaN loss on rank 1 alone: both ranks skipped that step and trained on
    assert r0["bad_skipped"] == r1["bad_skipped"] == 1 and not torch.equal(r0["bad_start"], r0["bad_after"])
    assert not torch.equal(r0["rm_start"], r0["rm_after"])
    assert not torch.equal(r0["ppo_start"], r0["ppo_policy"])
    assert r0["reward_stats"] == r1["reward_stats"]  # running reward statistics see every rank's scores
    assert r0["ppo_scores"] != r1["ppo_scores"]      # ...while each rank sampled its own answers
    # PPO resumed on 2 processes from the step-1 checkpoint: the same sampled answers, the same weights
    assert torch.equal(r0["ppo_resumed"][0], r0["ppo_policy"]) and torch.equal(r0["ppo_resumed"][1], r0["ppo_value"])

    # only rank 0 wrote, and what it wrote is complete
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    assert (tmp_path / "rm" / "reward_model").is_dir() and (tmp_path / "rm" / "train_summary.json").is_file()

    # 2 ranks x 2 pairs with mean-reduced gradients = one process on the whole batch of 4
    lm, _ = build_tiny_llama(tokenizer, seed=10)
    rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
    single = RewardTrainer(rm, tokenizer, worker.rm_config(tmp_path / "single"))
    assert torch.equal(worker.flat(rm), r0["rm_start"])
    single.train(worker.toy_pairs(8))
    assert_close_to_one_process(worker.flat(rm), r0["rm_after"], "DDP reward model")

    # SFT with gradient accumulation (no_sync) and a rank without data in the last step = one process
    sft_model, _ = build_tiny_llama(tokenizer, seed=50)
    sft = SFTTrainer(sft_model, tokenizer, worker.sft_config(tmp_path / "sft_single"))
    assert torch.equal(worker.flat(sft_model), r0["sft_start"])
    sft_loss = sft.train(worker.sft_records(9))["train_loss"]
    assert not torch.equal(r0["sft_start"], r0["sft_after"])
    assert sft_loss == pytest.approx(r0["sft_loss"], abs=1e-5)
    assert_close_to_one_process(worker.flat(sft_model), r0["sft_after"], "DDP SFT")

    # sampled generation split over ranks: every rank holds every answer, and the global RNG agrees again
    assert r0["sampled"] == r1["sampled"] and len(r0["sampled"]) == 5
    assert (r0["batches"], r1["batches"]) == (2, 1)  # 3 batches of 2: rank 0 takes the 1st and 3rd
    assert torch.equal(r0["rng_after"], r1["rng_after"])

    # DPO: the same on 2 ranks as on one process with the whole batch; the logged loss is the batch's
    assert torch.equal(r0["dpo_start"], r1["dpo_start"]) and torch.equal(r0["dpo_after"], r1["dpo_after"])
    assert r0["dpo_loss"] == r1["dpo_loss"]
    assert sorted(p.name for p in (tmp_path / "dpo").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    policy, _ = build_tiny_llama(tokenizer, seed=30)
    dpo = DPOTrainer(policy, tokenizer, worker.dpo_config(tmp_path / "dpo_single"))
    assert torch.equal(worker.flat(dpo.policy), r0["dpo_start"])
    history = dpo.train(worker.toy_pairs(8), show_progress=False)["history"]
    assert [h["loss"] for h in history] == pytest.approx(r0["dpo_loss"], abs=1e-5)
    assert not torch.equal(r0["dpo_start"], r0["dpo_after"])
    assert_close_to_one_process(worker.flat(dpo.policy), r0["dpo_after"], "DDP DPO")


@pytest.mark.slow
def test_ppo_and_grpo_on_ddp_stay_in_sync_match_one_process_and_resume(tokenizer, tmp_path, monkeypatch):
    """PPO (policy and critic wrapped in DDP) and GRPO (policy in DDP) on 2 gloo processes, one prompt per
    rank: identical weights on both ranks, close to one process on both prompts (the answers are fixed
    per prompt, `rl_ddp_worker.fixed_answers`, so both runs see the same rollouts), and a run resumed
    from its step-2 checkpoint on both ranks ends where the uninterrupted one ended."""
    from src.safety.constitutional.rl import rollout as rl_rollout

    torchrun_worker("rl_ddp_worker.py", tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rl_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["modes"] == r1["modes"] == ["ddp", "ddp", "ddp"]  # distributed: auto under torchrun
    for key in ("ppo_start", "ppo_policy", "ppo_value", "ppo_resumed_policy", "ppo_resumed_value",
                "grpo_start", "grpo_policy"):
        assert torch.equal(r0[key], r1[key]), key
    assert not torch.equal(r0["ppo_start"], r0["ppo_policy"]) and not torch.equal(r0["grpo_start"], r0["grpo_policy"])
    assert r0["ppo_skipped"] == r0["grpo_skipped"] == [0] * rl_ddp_worker.STEPS
    assert r0["ppo_scores"] != r1["ppo_scores"]  # each rank scored its own prompt's answer
    # exact resume under DDP: from the step-2 checkpoint (rank 0 wrote it) to the same end, bit for bit
    assert torch.equal(r0["ppo_resumed_policy"], r0["ppo_policy"]) and torch.equal(r0["ppo_resumed_value"], r0["ppo_value"])
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == \
        ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]

    # one process, both prompts in one batch (distributed: auto -> none)
    monkeypatch.setattr(rl_rollout, "generate", rl_ddp_worker.fixed_answers)
    ppo = rl_ddp_worker.ppo_trainer(tokenizer, seed=70)
    assert ppo.policy_parallel.mode == "none" and torch.equal(rl_ddp_worker.flat(ppo.policy), r0["ppo_start"])
    rl_ddp_worker.train(ppo)
    assert_close_to_one_process(rl_ddp_worker.flat(ppo.policy), r0["ppo_policy"], "DDP PPO policy")
    assert_close_to_one_process(rl_ddp_worker.flat(ppo.value_model), r0["ppo_value"], "DDP PPO critic")
    grpo = rl_ddp_worker.grpo_trainer(tokenizer, seed=80)
    assert torch.equal(rl_ddp_worker.flat(grpo.policy), r0["grpo_start"])
    rl_ddp_worker.train(grpo)
    assert_close_to_one_process(rl_ddp_worker.flat(grpo.policy), r0["grpo_policy"], "DDP GRPO policy")


def test_online_rl_refuses_fsdp_and_unwrapped_training_under_torchrun(tiny_model, monkeypatch):
    from src.safety.constitutional.rl.policy_gradient import GRPOConfig
    from src.safety.constitutional.rl.ppo_trainer import PPOConfig
    from src.safety.constitutional.training import guarded_step

    assert PPOConfig().distributed == GRPOConfig().distributed == "auto"
    for config in (PPOConfig, GRPOConfig):
        with pytest.raises(ValueError, match="not supported for online RL"):
            config(distributed="fsdp")
    with pytest.raises(ValueError, match="distributed"):
        PPOConfig(distributed="zero3")
    # several processes: distributed='none' would leave the gradients unaveraged, so it stops
    monkeypatch.setattr(ddp, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="diverging copies"):
        parallel.wrap(tiny_model, "none")
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="not wrapped"):
        guarded_step.clip_and_step([(tiny_model, optimizer, 1.0)])


@pytest.mark.slow
def test_pipeline_under_torchrun_finishes_and_its_greedy_evaluation_equals_one_process(tmp_path):
    """The whole smoke pipeline under `torchrun --nproc_per_node 2`: every stage runs, rank 0 writes
    the same files one process writes, and evaluating the same models over 2 ranks (generation split
    by batches, gathered in prompt order) gives byte-identical greedy answers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAI_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "scripts" / "train_constitutional.py")
    small = ["--preset", "smoke", "-q", "--set", "evaluation.batch_size=2", "--set", "evaluation.benchmark_limit=5"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]

    def run(cmd, out, *extra):
        proc = subprocess.run(cmd + small + ["--output-dir", str(out), *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    one, two, two_eval = tmp_path / "one", tmp_path / "two", tmp_path / "two_eval"
    run([sys.executable, script], one)
    stdout = run(torchrun, two)
    assert stdout.count("[evaluate]") == 1 and "2 processes" in stdout  # rank 0 alone prints
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(two) == files(one)
    for stage in ("stage1_sft", "stage2_reward", "stage3_rl", "evaluation"):
        assert (two / stage / "stage.json").is_file()

    # the same models (the one-process run's), evaluated by 2 ranks
    run(torchrun, two_eval, "--stages", "evaluate", "--set", f"reuse_stages_from={one}")
    answers = [p.relative_to(one / "evaluation") for p in (one / "evaluation").rglob("answers.csv")]
    answers += [p.relative_to(one / "evaluation") for p in (one / "evaluation").rglob("records.json")]
    assert len(answers) == 9  # 3 models x (2 benchmarks + the toolkit's own prompt sets)
    for rel in answers:
        assert (two_eval / "evaluation" / rel).read_bytes() == (one / "evaluation" / rel).read_bytes(), rel
    assert len((one / "evaluation" / "benchmarks" / "xstest" / "rl" / "answers.csv").read_text().splitlines()) > 3


@pytest.mark.slow
def test_fsdp2_on_two_processes_checkpoints_sharded_and_resumes_on_one(tokenizer, tmp_path):
    """FSDP2 (fully_shard per decoder layer) on 2 gloo processes: SFT, a reward model and DPO train, equal on
    both ranks and close to one process; each checkpoint is a DCP folder written by both ranks plus a
    plain HF export; a run killed after step 2 resumes on ONE process from the sharded checkpoint and
    ends where the uninterrupted 2-process run ended."""
    from transformers import AutoModelForCausalLM

    torchrun_worker("fsdp_worker.py", tmp_path, "fsdp")
    r0, r1 = (torch.load(tmp_path / f"fsdp_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["sft"], r1["sft"]) and torch.equal(r0["rm"], r1["rm"]) and torch.equal(r0["dpo"], r1["dpo"])
    assert r0["sft_plain"]  # after training the trainer holds a plain (unsharded) model again

    # sharded checkpoints: every rank wrote its shard; the HF export loads as a plain model
    last = tmp_path / "sft" / "checkpoint-000004"
    assert sorted(p.name for p in (last / "policy.dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    exported = AutoModelForCausalLM.from_pretrained(last / "policy")
    assert torch.equal(fsdp_worker.flat(exported), r0["sft"])
    assert (tmp_path / "rm" / "reward_model" / "config.json").is_file()

    # the same global batch on one process
    model, _ = build_tiny_llama(tokenizer, seed=40)
    single = SFTTrainer(model, tokenizer, fsdp_worker.sft_config(tmp_path / "sft_single", "none"))
    single.train(fsdp_worker.sft_records())
    assert_close_to_one_process(fsdp_worker.flat(model), r0["sft"], "FSDP2 SFT")
    lm, _ = build_tiny_llama(tokenizer, seed=10)
    rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
    RewardTrainer(rm, tokenizer, fsdp_worker.rm_config(tmp_path / "rm_single", "none")).train(worker.toy_pairs(8))
    assert_close_to_one_process(worker.flat(rm), r0["rm"], "FSDP2 reward model")
    policy, _ = build_tiny_llama(tokenizer, seed=30)
    dpo = DPOTrainer(policy, tokenizer, worker.dpo_config(tmp_path / "dpo_single"))
    history = dpo.train(worker.toy_pairs(8), show_progress=False)["history"]
    assert [h["loss"] for h in history] == pytest.approx(r0["dpo_loss"], abs=1e-5)
    assert_close_to_one_process(worker.flat(dpo.policy), r0["dpo"], "FSDP2 DPO")
    assert (tmp_path / "dpo" / "checkpoint-000002" / "policy.dcp").is_dir()

    # killed (SIGKILL on every rank) right after the checkpoint of step 2 ...
    assert torchrun_worker("fsdp_worker.py", tmp_path, "fsdp_kill", check=False).returncode != 0
    killed = tmp_path / "sft_kill"
    assert sorted(p.name for p in killed.iterdir() if not p.name.startswith(".")) == \
        ["checkpoint-000001", "checkpoint-000002"]
    # ... and resumed on one process (no process group) from the 2-rank sharded checkpoint
    model, _ = build_tiny_llama(tokenizer, seed=99)
    resumed = SFTTrainer(model, tokenizer, fsdp_worker.sft_config(killed, "fsdp"))
    metrics = resumed.train(fsdp_worker.sft_records(), resume_from=killed)
    assert metrics["steps"] == 4 and resumed.parallel.mode == "none"
    assert metrics["train_loss"] == pytest.approx(r0["sft_loss"], abs=1e-5)
    assert_close_to_one_process(fsdp_worker.flat(resumed.model), r0["sft"], "FSDP2 SFT resumed on 1 process")


def test_sharded_checkpoint_loads_into_a_fresh_model_and_optimizer(tokenizer, tmp_path):
    """DCP round trip without a process group (the 1-process side of a world-size change): weights
    and AdamW state come back exactly, keyed by parameter name."""
    model, _ = build_tiny_llama(tokenizer, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    parallel.save_sharded(tmp_path / "policy.dcp", model, optimizer)

    fresh, _ = build_tiny_llama(tokenizer, seed=2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert not torch.equal(worker.flat(fresh), worker.flat(model))
    parallel.load_sharded(tmp_path / "policy.dcp", fresh, fresh_opt)
    assert torch.equal(worker.flat(fresh), worker.flat(model))
    for (_, a), (_, b) in zip(sorted(optimizer.state_dict()["state"].items()),
                              sorted(fresh_opt.state_dict()["state"].items())):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_parallel_modes_resolve_and_wrap_nothing_in_one_process(tiny_model):
    assert parallel.resolve_mode("auto") == parallel.resolve_mode("ddp") == parallel.resolve_mode("fsdp") == "none"
    par = parallel.wrap(tiny_model, "fsdp")
    assert par.mode == "none" and not par.wrapped and par.unwrap() is tiny_model
    assert not parallel.is_wrapped(tiny_model) and par(lambda m: m) is tiny_model
    with pytest.raises(ValueError, match="distributed"):
        parallel.check_mode("zero3")
