"""The smoke preset end to end (tiny model): every stage runs, writes its artifacts, and reruns skip."""
import json
import subprocess
import sys

import pytest

from src.safety.constitutional.common.config import ConfigError
from src.safety.constitutional.pipeline import Pipeline, load_pipeline_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    config = load_pipeline_config("smoke", overrides=[f"output_dir={out}"])
    results = Pipeline(config).run()
    return out, results


@pytest.mark.slow
def test_smoke_pipeline_writes_every_artifact(smoke_run):
    out, results = smoke_run
    assert list(results) == ["sft", "reward", "rl", "evaluate"]
    for path in ["config.yaml", "report.md", "plots/training_curves.png", "plots/principles.png",
                 "stage1_sft/audit.jsonl", "stage1_sft/sft.jsonl", "stage1_sft/model/config.json",
                 "stage2_reward/pairs.jsonl", "stage2_reward/model/config.json",
                 "stage3_rl/model/config.json", "stage3_rl/metrics.jsonl",
                 "evaluation/base/records.csv", "evaluation/rl/summary.json"]:
        assert (out / path).is_file(), path
    audit = [json.loads(line) for line in (out / "stage1_sft/audit.jsonl").read_text().splitlines()]
    assert audit and {"prompt", "rounds"} <= set(audit[0])
    report = (out / "report.md").read_text()
    for model in ("base", "sft", "rl"):
        assert f"| {model} " in report or f" {model} |" in report
    assert "harmful compliance" in report and "over-refusal" in report


def test_rerun_skips_finished_stages(smoke_run):
    out, _ = smoke_run
    before = (out / "stage3_rl/model/model.safetensors").stat().st_mtime_ns
    results = Pipeline(load_pipeline_config("smoke", overrides=[f"output_dir={out}"])).run()
    assert all(r.get("skipped") for r in results.values())
    assert (out / "stage3_rl/model/model.safetensors").stat().st_mtime_ns == before


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="rl.batch_size"):
        load_pipeline_config("smoke", overrides=["rl.batch_size=eight"])
    with pytest.raises(ConfigError, match="unknown option sft.epochs"):
        load_pipeline_config("smoke", overrides=["sft.epochs=3"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_pipeline_config("nope")


def test_scientific_notation_without_a_dot_is_a_number():
    # YAML 1.1 reads 5e-6 as a string; a learning rate written that way must still work
    config = load_pipeline_config("smoke", overrides=["rl.ppo.learning_rate=5e-6", "rl.dpo.learning_rate=1E-7"])
    assert config.rl.ppo.learning_rate == 5e-6 and config.rl.dpo.learning_rate == 1e-7
    with pytest.raises(ConfigError, match="rl.ppo.learning_rate: expected a number"):
        load_pipeline_config("smoke", overrides=["rl.ppo.learning_rate=fast"])


@pytest.mark.slow
def test_cli_help_documents_every_option():
    out = subprocess.run([sys.executable, "scripts/train_constitutional.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for option in ("--preset", "--model", "--constitution", "--output-dir", "rl.steps", "sft.learning_rate",
                   "reward.trainable_layers", "rl.ppo.kl_penalty"):
        assert option in out


@pytest.mark.parametrize("algorithm,dpo_pairs", [("grpo", None), ("dpo", "preferences"), ("dpo", "stage1"),
                                                        ("dpo", "judged")])
def test_stage3_algorithms_swap_in(smoke_run, tmp_path, algorithm, dpo_pairs):
    """Another algorithm on the finished run's SFT and reward models, without touching that run."""
    out, _ = smoke_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run = tmp_path / algorithm
    config = load_pipeline_config("smoke", overrides=[f"output_dir={run}", f"reuse_stages_from={out}",
                                                      f"rl.algorithm={algorithm}", "stages=[rl, evaluate]",
                                                      "evaluation.models=[rl]"]
                                  + ([f"rl.dpo_pairs={dpo_pairs}"] if dpo_pairs else []))
    results = Pipeline(config).run()
    result = results["rl"]
    assert result["algorithm"] == algorithm and not result.get("skipped")
    assert (run / "stage3_rl/model/model.safetensors").is_file()
    assert not (run / "stage1_sft").exists() and not (run / "stage2_reward").exists()
    assert results["evaluate"]["models"] == ["rl"]
    assert "mean_reward" in results["evaluate"]["summary"]["rl"]["harmful"]
    if algorithm == "dpo":
        assert result["num_pairs"] > 0 and "avg_loss" in result["final_stats"]
        assert list(result["pair_sources"]) == [dpo_pairs]
    if dpo_pairs == "stage1":  # one pair per revised red-team answer and per benign answer of stage 1
        sft_records = [json.loads(line) for line in (out / "stage1_sft/sft.jsonl").read_text().splitlines()]
        chains = [json.loads(line) for line in (out / "stage1_sft/audit.jsonl").read_text().splitlines()]
        revised = sum(c["initial_response"].strip() != c["final_response"].strip() for c in chains)
        helpful = sum(r.get("source") == "helpful" for r in sft_records)
        assert result["pair_sources"]["stage1"] == {"revision_pairs": revised, "helpful_pairs": helpful}
        assert result["num_pairs"] == revised + helpful > 0
    if dpo_pairs == "judged":  # sampled from the SFT model on the RL pool, kept for a resumed run
        stats = json.loads((run / "stage3_rl/judged_pairs_stats.json").read_text())
        assert stats == {k: v for k, v in result["pair_sources"]["judged"].items() if k != "pairs_after_balancing"}
        assert stats["samples"] == 4 * stats["prompts"] and 0 < stats["pairs"] <= stats["prompts"]
        assert len((run / "stage3_rl/judged_pairs.jsonl").read_text().splitlines()) == stats["pairs"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_reuse_stages_from_must_exist(tmp_path):
    config = load_pipeline_config("smoke", overrides=[f"output_dir={tmp_path / 'run'}",
                                                      f"reuse_stages_from={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="reuse_stages_from"):
        Pipeline(config)
