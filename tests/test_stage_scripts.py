"""The single-stage scripts are the pipeline's stages with the pipeline's options: they compose through
one run folder, take a reward model from elsewhere, and stop with a clear error on a missing input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data" / "preferences"


def run(script, *args):
    env = dict(os.environ, CAI_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--preset", "smoke", "-q", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env)


def test_shortcuts_are_config_keys():
    """A stage script's flags are spellings of PipelineConfig keys, never options of their own."""
    out = run("train_ppo.py", "--policy", "tiny", "--steps", "7", "--prompts", "p.txt", "--set", "rl.batch_size=3",
              "--print-config")
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["stages"] == ["rl"] and config["model"] == "tiny" and config["rl"]["steps"] == 7
    assert config["data"]["train_prompts"] == "p.txt" and config["rl"]["batch_size"] == 3
    out = run("train_reward_model.py", "--human-only", "--print-config")
    assert out.returncode == 2 and "no human pairs" in out.stderr  # nothing to train on is an error


@pytest.mark.slow
def test_stage_scripts_compose(tmp_path):
    sft_run, rm_run = tmp_path / "a", tmp_path / "b"
    out = run("train_sft.py", "--output-dir", str(sft_run))
    assert out.returncode == 0, out.stderr
    assert (sft_run / "stage1_sft" / "model" / "model.safetensors").is_file()
    assert not (sft_run / "stage2_reward").exists()

    out = run("train_reward_model.py", "--output-dir", str(rm_run), "--human-only", "--pairs",
              str(PAIRS / "hh_rlhf_harmless_train.jsonl.gz"), "--num-pairs", "40",
              "--eval-pairs", str(PAIRS / "hh_rlhf_harmless_heldout.jsonl.gz"))
    assert out.returncode == 0, out.stderr
    stage = json.loads((rm_run / "stage2_reward" / "stage.json").read_text())
    assert stage["num_train_pairs"] == 40 and stage["preferences"] == {"pairs": 0}
    assert stage["human_heldout"]["pairs"] == 300 and 0 <= stage["human_heldout"]["accuracy"] <= 1
    assert not (rm_run / "stage2_reward" / "pairs.jsonl").exists()  # no AI-labelled pairs were made

    # a policy without a reward model: the error names what is missing, nothing is written
    out = run("train_ppo.py", "--output-dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "reward_model" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "c" / "stage3_rl").exists()

    out = run("train_ppo.py", "--output-dir", str(sft_run), "--reward-model", str(rm_run / "stage2_reward" / "model"),
              "--steps", "2", "--evaluate")
    assert out.returncode == 0, out.stderr
    rl = json.loads((sft_run / "stage3_rl" / "stage.json").read_text())
    assert rl["algorithm"] == "ppo" and len((sft_run / "stage3_rl" / "metrics.jsonl").read_text().splitlines()) == 2
    # RL started from the run folder's stage-1 model and evaluation compared all three
    assert json.loads((sft_run / "evaluation" / "stage.json").read_text())["models"] == ["base", "sft", "rl"]
    config = yaml.safe_load((sft_run / "config.yaml").read_text())
    assert config["reward_model"] == str(rm_run / "stage2_reward" / "model")
