"""Faults and bad input: SIGKILL + resume, Ctrl-C, half-written checkpoints, a full disk, NaN stops.

Cases covered elsewhere (not repeated here):
  malformed constitution        tests/test_constitution.py (test_bad_field_names..., test_file_level_errors,
                                test_missing_field_and_unnamed_principle)
  empty / non-text prompts      tests/test_generation.py::test_bad_prompts_are_rejected
  over-long prompts             the same test: truncated with a warning, or rejected (truncate_prompts=False)
  missing model                 tests/test_models.py::test_missing_model_gives_clear_error
  reward vocabulary != policy's tests/test_ppo_trainer.py::test_reward_vocabulary_mismatch_needs_reward_tokenizer
  NaN steps skipped + counted   test_sft.py / test_reward_training.py / test_ppo_trainer.py (here: the stop
                                leaves the last good checkpoint intact on disk)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.models import RewardModel, build_tiny_llama
from src.models.heads import score_head
from src.safety.constitutional.common import checkpoint as ckpt
from src.safety.constitutional.common.io import atomic_write_json, read_prompts
from src.safety.constitutional.rl.dpo import DPOTrainer
from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer, PPOTrainingError
from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig
from src.safety.constitutional.training.sft import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
import reliability_worker as worker  # noqa: E402

FINAL_STEP = {"sft": 4, "rm": 4, "ppo": 4}


@pytest.fixture()
def one_thread():
    """Bit-exact comparisons with the 1-thread worker processes need the same thread count here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same_weights(models_a, models_b, label):
    for a, b in zip(models_a, models_b):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), f"{label}: {name} differs"


# -- SIGKILL mid-run, then resume ------------------------------------------------------------------

@pytest.fixture(params=["fp32", "bf16"])
def precision(request):
    """Both compute precisions: bf16 (the default on CPUs with native bf16) must resume exactly too."""
    from src.models.precision import set_precision
    set_precision(request.param)
    yield request.param
    set_precision(None)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tokenizer, tmp_path, one_thread, precision):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAI_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "CAI_PRECISION": precision}
    procs = {stage: subprocess.Popen([sys.executable, str(ROOT / "tests" / "reliability_worker.py"), stage,
                                      str(tmp_path / stage / "killed"), "0.3"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for stage in FINAL_STEP}
    deadline = time.time() + 180
    try:
        while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
            for stage, proc in procs.items():
                root = worker.checkpoint_root(stage, tmp_path / stage / "killed")
                if proc.poll() is None and ckpt.latest_checkpoint(root) is not None:
                    os.kill(proc.pid, signal.SIGKILL)  # right after the first checkpoint appears
                    proc.wait()
            time.sleep(0.02)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for stage, proc in procs.items():
        assert proc.returncode == -signal.SIGKILL, f"{stage}: {proc.stderr.read().decode()[-2000:]}"
        proc.stderr.close()
        killed = tmp_path / stage / "killed"
        step = ckpt.load_checkpoint(worker.checkpoint_root(stage, killed), restore_rng=False).step
        assert 1 <= step < FINAL_STEP[stage], f"{stage}: killed at step {step}, not mid-run"

        straight = worker.run(stage, tmp_path / stage / "straight", tokenizer=tokenizer)
        resumed = worker.run(stage, killed, resume=True, tokenizer=tokenizer)
        _assert_same_weights(straight, resumed, stage)


# -- Ctrl-C: the step finishes, a checkpoint is written, the run resumes exactly ---------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "ppo", "dpo"])
def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(stage, tokenizer, tmp_path, monkeypatch, one_thread):
    hook = {"sft": (SFTTrainer, "_train_step"), "ppo": (PPOTrainer, "train_step"),
            "dpo": (DPOTrainer, "train_step")}[stage]
    real = getattr(*hook)
    calls = {"n": 0}

    def interrupt_during_step_2(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the step
        return real(self, *args, **kwargs)

    handler_before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(*hook, interrupt_during_step_2)
    with pytest.raises(KeyboardInterrupt, match="rerun"):
        worker.run(stage, tmp_path / "cut", tokenizer=tokenizer)
    monkeypatch.setattr(*hook, real)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer restored the handler
    assert ckpt.load_checkpoint(tmp_path / "cut", restore_rng=False).step == 2

    straight = worker.run(stage, tmp_path / "straight", tokenizer=tokenizer)
    resumed = worker.run(stage, tmp_path / "cut", resume=True, tokenizer=tokenizer)
    _assert_same_weights(straight, resumed, stage)


# -- half-written checkpoints are never loaded -------------------------------------------------------

def test_incomplete_checkpoints_are_reported_and_the_previous_one_used(tiny_model, tokenizer, tmp_path, caplog):
    good = ckpt.save_checkpoint(tmp_path, 1, {"policy": tiny_model}, tokenizer, trainer_state={"step": 1},
                                keep_last=None)
    # a newer checkpoint cut off mid-write: truncated weights, no checkpoint.json
    partial = shutil.copytree(good, tmp_path / "checkpoint-000002")
    (partial / ckpt.META_FILE).unlink()
    weights = partial / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # one whose checkpoint.json lacks "complete", one with torn JSON, and a leftover temporary folder
    shutil.copytree(good, tmp_path / "checkpoint-000003")
    atomic_write_json(tmp_path / "checkpoint-000003" / ckpt.META_FILE, {"step": 3, "models": ["policy"]})
    shutil.copytree(good, tmp_path / "checkpoint-000004")
    (tmp_path / "checkpoint-000004" / ckpt.META_FILE).write_text('{"step": 4, "compl')
    shutil.copytree(good, tmp_path / ".tmp-checkpoint-000005-abc")

    with caplog.at_level("WARNING"):
        assert ckpt.latest_checkpoint(tmp_path) == good
        loaded = ckpt.load_checkpoint(tmp_path, restore_rng=False)
    assert loaded.step == 1 and loaded.trainer_state == {"step": 1}
    reported = " ".join(r.getMessage() for r in caplog.records)
    for name in ("checkpoint-000002", "checkpoint-000003", "checkpoint-000004"):
        assert f"incomplete checkpoint {tmp_path / name}" in reported
    model, _ = build_tiny_llama(tokenizer, seed=5)
    ckpt.load_model_weights(model, loaded.model_dir("policy"))
    _assert_same_weights([tiny_model], [model], "loaded")

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-000003")


# -- a full disk while saving -----------------------------------------------------------------------

def _enospc_after_partial_write(real_save):
    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 100)  # some bytes made it to disk, then the disk filled up
        raise OSError(28, "No space left on device")
    return save


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tiny_model, tokenizer, tmp_path, monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 1, {"policy": tiny_model}, tokenizer, trainer_state={"step": 1})
    before = sorted(p.name for p in tmp_path.iterdir())
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    monkeypatch.setattr(torch, "save", _enospc_after_partial_write(torch.save))
    with pytest.raises(OSError, match="disk full") as err:
        ckpt.save_checkpoint(tmp_path, 2, {"policy": tiny_model}, tokenizer, trainer_state={"step": 2})
    assert err.value.errno == 28
    # the same step again (a re-save): the old copy must survive too
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 1, {"policy": tiny_model}, tokenizer, trainer_state={"step": 1})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half checkpoint, no temporary left
    loaded = ckpt.load_checkpoint(tmp_path, restore_rng=False)
    assert loaded.path == first and loaded.trainer_state == {"step": 1}
    model, _ = build_tiny_llama(tokenizer, seed=0)
    ckpt.load_model_weights(model, loaded.model_dir("policy"))
    assert not torch.equal(next(model.parameters()), next(tiny_model.parameters()))  # the step-1 weights


def test_disk_full_on_rename_during_a_re_save_restores_the_old_checkpoint(tiny_model, tokenizer, tmp_path,
                                                                         monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 1, {"policy": tiny_model}, tokenizer, trainer_state={"step": 1})
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-checkpoint-0"):  # the finished folder's rename into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 1, {"policy": tiny_model}, tokenizer, trainer_state={"step": 99})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert ckpt.load_checkpoint(tmp_path, restore_rng=False).trainer_state == {"step": 1}


def test_disk_full_while_writing_a_file_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_json(target, {"version": 1})
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[:5], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="disk full while writing"):
        atomic_write_json(target, {"version": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# -- NaN/inf: the run stops with a message, the last good checkpoint intact on disk --------------------

def _poison_after(module, n_good_calls):
    calls = {"n": 0}

    def hook(mod, args, output):
        calls["n"] += 1
        if calls["n"] <= n_good_calls:
            return output
        if hasattr(output, "logits"):
            output.logits = output.logits * float("nan")
            return output
        return output * float("nan")
    return module.register_forward_hook(hook)


def _assert_checkpoint_holds(root, step, model, name):
    loaded = ckpt.load_checkpoint(root, restore_rng=False)
    assert loaded.step == step
    fresh = type(model).from_pretrained(loaded.model_dir(name)) if hasattr(type(model), "from_pretrained") else None
    for (key, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.isfinite(q).all() and torch.equal(p, q), key  # skipped steps left the weights alone


def test_sft_nan_stop_leaves_the_last_good_checkpoint(tiny_model, tokenizer, tmp_path):
    # SFT runs the LM head itself (answer positions only), so poison the head's output
    _poison_after(tiny_model.get_output_embeddings(), 2)  # steps 1-2 fine, every later forward is NaN
    cfg = SFTConfig(output_dir=str(tmp_path), num_epochs=2, batch_size=2, learning_rate=1e-3, checkpoint_every=1,
                    eval_fraction=0.0, max_bad_steps=0, show_progress=False)
    with pytest.raises(RuntimeError, match="last good checkpoint is in"):
        SFTTrainer(tiny_model, tokenizer, cfg).train(worker.SFT_RECORDS, eval_records=[])
    _assert_checkpoint_holds(tmp_path, 2, tiny_model, "policy")


def test_reward_model_nan_stop_leaves_the_last_good_checkpoint(tokenizer, tmp_path):
    lm, _ = build_tiny_llama(tokenizer, seed=3)
    rm = RewardModel.from_causal_lm(lm, device="cpu", head_init_std=0.02)
    _poison_after(score_head(rm), 2)  # one head call per step (all chosen and rejected answers together)
    cfg = RewardTrainerConfig(output_dir=str(tmp_path), batch_size=2, max_length=32, learning_rate=1e-3,
                              eval_fraction=0.0, checkpoint_every=1, max_bad_steps=0, show_progress=False)
    with pytest.raises(RuntimeError, match="last good checkpoint is in"):
        RewardTrainer(rm, tokenizer, cfg).train(worker.PAIRS)
    _assert_checkpoint_holds(tmp_path / "checkpoints", 2, rm, "reward_model")


def test_ppo_nan_stop_leaves_the_last_good_checkpoint(tokenizer, tmp_path):
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    reward = RewardModel.from_causal_lm(build_tiny_llama(tokenizer, seed=1)[0], device="cpu", head_init_std=0.5)
    _poison_after(reward, 2)  # one scoring forward per step: steps 1-2 fine, then NaN scores
    trainer = PPOTrainer(policy, None, reward, tokenizer, "cpu",
                         config=PPOConfig(learning_rate=1e-3, max_bad_steps=1, reward_normalization="none"))
    # steps 3 and 4 are skipped (weights untouched; step 3 is still checkpointed): one bad step in a
    # row is tolerated, the second stops the run
    with pytest.raises(PPOTrainingError, match="checkpoint-000003"):
        trainer.train(worker.PROMPTS, num_steps=6, batch_size=2, num_epochs_per_batch=1, max_length=3,
                      checkpoint_dir=tmp_path, checkpoint_freq=1, show_progress=False)
    assert trainer.step == 4 and trainer.total_skipped_updates == 2
    _assert_checkpoint_holds(tmp_path, 3, policy, "policy")


# -- bad input not covered by other test files --------------------------------------------------------

def test_prompt_file_without_text_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n   \n")
    with pytest.raises(ValueError, match="no non-empty prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "numbers.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    with pytest.raises(ValueError, match="line 2 has no text field"):
        read_prompts(tmp_path / "numbers.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
