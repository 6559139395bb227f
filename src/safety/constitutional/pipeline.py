"""The whole Constitutional-AI pipeline: critique-revise SFT -> AI-feedback reward model -> RL -> evaluation.

    run_dir/
      config.yaml                 the resolved configuration of this run
      stage1_sft/                 audit.jsonl (critique chains), sft.jsonl, checkpoints/, model/, stage.json
      stage2_reward/              pairs.jsonl (AI-labelled, with principle), checkpoints/, model/, stage.json
      stage3_rl/                  checkpoints/, model/, metrics.jsonl, stage.json
      evaluation/<model>/         answers.csv, summary.json, summary.md, principles.png
      report.md, plots/*.png      the final report

A stage whose `stage.json` exists is skipped on a rerun; an interrupted stage resumes from its last
checkpoint (and reuses the data it had already generated). Each stage reads its input model from
the previous stage's `model/` folder, so any stage can also be run alone on any model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from src.models import RewardModel, ValueModel, load_causal_lm, resolve_device, seed_everything
from src.models.lora import merge_lora
from src.models.precision import set_precision

from .common import distributed as ddp
from .common.checkpoint import latest_checkpoint
from .common.config import from_dict, to_dict
from .common.io import REPO_ROOT, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, read_prompts
from .common.pairs import load_pairs
from .judging.constitution import load_constitution
from .judging.framework import ConstitutionalFramework
from .judging.judge_reward import RuleBasedReward
from .rl.algorithms import make_rl_trainer
from .rl.dpo import DPOConfig, DPOTrainer
from .rl.policy_gradient import GRPOConfig, REINFORCEConfig, RLOOConfig
from .rl.ppo_trainer import PPOConfig
from .stages.critique_revision import CritiqueRevisionConfig, run_critique_revision, write_sft_dataset
from .stages.evaluation import compare_reports, evaluate_model
from .stages.preferences import (PreferenceConfig, balance_judged_pairs, generate_preference_pairs, judged_pairs,
                                 stage1_pairs, write_pairs)
from .training.generation import GenerationConfig, sharded_across_ranks
from .training.reward_training import RewardTrainer, RewardTrainerConfig
from .training.sft import SFTConfig, SFTTrainer

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "rl", "evaluate")
RL_STAGE_ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce", "dpo")
DPO_PAIR_SOURCES = ("preferences", "stage1", "both", "judged")
EVALUATORS = ("rules", "classifier", "harm_judge", "judge")


@dataclass
class DataConfig:
    """Prompt files (JSONL `prompt` field, CSV `prompt` column or TXT) and how many of each to use."""

    train_prompts: str = "data/prompts/red_team_train.jsonl"        # red-team prompts for stages 1-3
    benign_train_prompts: str = "data/prompts/benign_train.jsonl"   # helpful mix-in for SFT
    eval_harmful_prompts: str = "data/prompts/red_team_eval.jsonl"  # held out: never trained on
    eval_benign_prompts: str = "data/prompts/benign_eval.jsonl"     # held out: over-refusal check
    num_sft_prompts: int = 48           # red-team prompts through critique-revision
    num_preference_prompts: int = 64    # prompts sampled twice and labelled by the constitution (0: human pairs only)
    num_rl_prompts: int = 64            # prompt pool for RL rollouts (red-team prompts)
    num_rl_benign_prompts: int = 0      # benign prompts added to that pool, so RL also sees requests it must answer
    num_eval_prompts: int = 50          # per evaluation set
    human_pairs: Optional[str] = None   # human preference pairs (hh-rlhf format) mixed into stage 2's AI pairs
    num_human_pairs: int = 0            # how many of them (0: AI feedback only)
    stage1_pairs: bool = False          # stage 2 also trains on stage 1's decisions: revision > first answer (red-team), own answer > a written refusal (benign mix-in); preferences.stage1_pairs
    reward_eval_pairs: Optional[str] = None  # human pairs never trained on (every pair of the file): the RM's held-out accuracy

    def __post_init__(self):
        for name in ("num_sft_prompts", "num_rl_prompts", "num_eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_preference_prompts < 0:
            raise ValueError(f"data.num_preference_prompts must be >= 0, got {self.num_preference_prompts}")
        if self.num_preference_prompts == 0 and not (self.human_pairs and self.num_human_pairs > 0):
            raise ValueError("data.num_preference_prompts is 0 and there are no human pairs "
                             "(data.human_pairs, data.num_human_pairs): stage 2 would have nothing to train on")
        if self.num_rl_benign_prompts < 0:
            raise ValueError(f"data.num_rl_benign_prompts must be >= 0, got {self.num_rl_benign_prompts}")


@dataclass
class RewardStageConfig(RewardTrainerConfig):
    """Stage 2: the reward trainer's settings, plus how the reward model is built from the SFT model."""

    keep_layers: Optional[int] = None   # build the reward model on the bottom K layers only (cheaper to train and to run in RL; None/0: all)


@dataclass
class RLStageConfig:
    """Stage 3: which algorithm, how long, and the algorithm's own settings."""

    algorithm: str = "ppo"              # ppo | grpo | rloo | reinforce | dpo (DPO on preference pairs instead of RL on the RM)
    dpo_pairs: str = "preferences"      # DPO's pairs: preferences (stage 2's AI + human pairs) | stage1 (stage 1's decisions: revision > first answer, own benign answer > written refusal) | both | judged (the policy's own samples on the RL prompt pool, best > worst by the rule-based judge: preferences.judged_pairs)
    dpo_samples_per_prompt: int = 4     # rl.dpo_pairs=judged: answers sampled per prompt (rl.temperature, rl.max_new_tokens)
    dpo_benign_ratio: Optional[float] = 1.0  # rl.dpo_pairs=judged: repeat pairs until benign = ratio x harmful (preferences.balance_judged_pairs); null: as sampled
    steps: int = 20                     # RL steps (one rollout batch + its update epochs each)
    batch_size: int = 8                 # prompts per step
    num_epochs_per_batch: int = 4       # update epochs over each rollout batch
    max_new_tokens: int = 48            # answer length limit during rollouts
    temperature: float = 1.0            # sampling temperature (log-probs use the same)
    checkpoint_freq: int = 5            # steps between checkpoints
    judge_reward_weight: float = 0.0    # > 0: add weight * the framework's rule-based reward (judge_reward.RuleBasedReward) to the RM score; 0: off (docs/ppo.md)
    judge_overrefusal_penalty: float = 1.0  # multiplies the judge term's benign rows: > 1 makes refusing a benign prompt cost more than refusing a harmful one earns
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    reinforce: REINFORCEConfig = field(default_factory=REINFORCEConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self):
        if self.algorithm not in RL_STAGE_ALGORITHMS:
            raise ValueError(f"rl.algorithm must be one of {', '.join(RL_STAGE_ALGORITHMS)}, got {self.algorithm!r}")
        if self.dpo_pairs not in DPO_PAIR_SOURCES:
            raise ValueError(f"rl.dpo_pairs must be one of {', '.join(DPO_PAIR_SOURCES)}, got {self.dpo_pairs!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("rl.steps and rl.batch_size must be >= 1")
        if self.dpo_benign_ratio is not None and not self.dpo_benign_ratio > 0:
            raise ValueError(f"rl.dpo_benign_ratio must be > 0 (or null), got {self.dpo_benign_ratio!r}")
        if self.dpo_samples_per_prompt < 2:
            raise ValueError(f"rl.dpo_samples_per_prompt must be >= 2, got {self.dpo_samples_per_prompt}")
        if not self.judge_reward_weight >= 0:
            raise ValueError(f"rl.judge_reward_weight must be >= 0 (0: off), got {self.judge_reward_weight!r}")
        if not self.judge_overrefusal_penalty >= 0:
            raise ValueError(f"rl.judge_overrefusal_penalty must be >= 0, got {self.judge_overrefusal_penalty!r}")


@dataclass
class EvalStageConfig:
    """Final evaluation of the base and each stage's model on held-out prompts (greedy answers)."""

    max_new_tokens: int = 96            # answer length limit when evaluating
    batch_size: int = 16                # prompts per generation batch
    num_examples: int = 4               # example answers shown side by side in the report
    models: List[str] = field(default_factory=lambda: ["base", "sft", "rl"])  # which models to evaluate
    benchmarks: List[str] = field(default_factory=list)  # standard safety benchmarks run on each model: xstest, advbench, or a CSV/JSONL path (docs/benchmarks.md)
    benchmark_limit: Optional[int] = None  # prompts per benchmark (spread over the set); None: all of them
    benchmark_max_new_tokens: int = 64     # answer length limit on the benchmarks

    def __post_init__(self):
        bad = [m for m in self.models if m not in ("base", "sft", "rl")]
        if bad or not self.models:
            raise ValueError(f"evaluation.models: choose from base, sft, rl, got {self.models!r}")
        from .stages.benchmarks import BUILTIN_BENCHMARKS
        bad = [b for b in self.benchmarks if b not in BUILTIN_BENCHMARKS and not str(b).endswith((".csv", ".jsonl"))]
        if bad:
            raise ValueError(f"evaluation.benchmarks: {bad[0]!r} is neither a built-in benchmark "
                             f"({', '.join(BUILTIN_BENCHMARKS)}) nor a .csv/.jsonl prompt file")
        if self.benchmark_limit is not None and self.benchmark_limit < 1:
            raise ValueError(f"evaluation.benchmark_limit must be >= 1 (or null for all), got {self.benchmark_limit}")


@dataclass
class PipelineConfig:
    preset: str = "default"             # name of the preset this config started from
    model: str = "default"              # "default" (SmolLM2-135M-Instruct), "tiny", or a local HF model folder
    constitution: Optional[str] = None  # None: data/constitution.yaml
    output_dir: str = "runs/default"
    device: Optional[str] = None        # None: CUDA if present, else CPU
    dtype: Optional[str] = None         # weights: None = fp32 (trainable weights need it; see src/models/precision.py)
    precision: Optional[str] = None     # matmuls: auto (bf16 on CUDA and CPUs with native bf16) | bf16 | fp32; None: $CAI_PRECISION or auto
    seed: int = 0                       # every random choice of the run derives from it
    stages: List[str] = field(default_factory=lambda: list(STAGES))  # subset of sft, reward, rl, evaluate
    reuse_stages_from: Optional[str] = None  # a run folder whose finished stages stand in for the stages this run does not list (read only)
    evaluators: List[str] = field(default_factory=lambda: ["rules", "harm_judge"])  # rules, classifier (MiniLM), harm_judge (SmolLM2 layer-8 probe on human pairs), judge (a chat model asked yes/no): who scores and labels answers; the default is chosen in docs/evaluators.md
    refusal_classifier: Optional[str] = "default"  # 3-class refusal classifier deciding `refused`: "default" (data/judges/refusal.npz), a weights file, or null for the rules' regexes
    judge_model: Optional[str] = None   # a local chat model folder for the judge instead of the base model (implies 'judge'; e.g. a 7B instruct model on a GPU)
    reward_model: Optional[str] = None  # a trained reward model folder that RL and evaluation use instead of stage 2's (e.g. from scripts/train_reward_model.py)
    guard_model: Optional[str] = None   # a local sequence-classification folder (guard classifier or reward model) judging the principles that list 'guard'; labels mapped by the constitution's guard: block
    data: DataConfig = field(default_factory=DataConfig)
    critique: CritiqueRevisionConfig = field(default_factory=CritiqueRevisionConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    rl: RLStageConfig = field(default_factory=RLStageConfig)
    evaluation: EvalStageConfig = field(default_factory=EvalStageConfig)

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown stage {bad[0]!r} (choose from {', '.join(STAGES)})")
        bad = [e for e in self.evaluators if e not in EVALUATORS]
        if bad or not self.evaluators:
            raise ValueError(f"evaluators: choose from {', '.join(EVALUATORS)}, got {self.evaluators!r}")


def _resolve(path: Optional[str]) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def _take(items: List, n: int, seed: int) -> List:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:n]


class Pipeline:
    """Runs the stages in order; each one is skipped if finished and resumed if interrupted."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.run_dir = Path(config.output_dir)
        # Under torchrun: generation-only steps split their batches over the ranks, the trainers are
        # data-parallel, every rank holds every result, and only rank 0 writes (docs/distributed.md).
        ddp.init_distributed()
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None and ddp.world_size() > 1:
            self.device = torch.device("cuda", ddp.local_rank())
        set_precision(config.precision)
        self.constitution = load_constitution(_resolve(config.constitution))
        self._framework: Optional[ConstitutionalFramework] = None
        if config.reuse_stages_from and not Path(config.reuse_stages_from).is_dir():
            raise FileNotFoundError(f"reuse_stages_from: no run folder at {config.reuse_stages_from}")

    # -- helpers ------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        folder = {"sft": "stage1_sft", "reward": "stage2_reward", "rl": "stage3_rl", "evaluate": "evaluation"}[name]
        own = self.run_dir / folder
        # Another run's finished stage stands in for one this run does not do (e.g. a second RL
        # algorithm on the same SFT and reward models). Stages this run lists are always its own,
        # so nothing is ever written into the other run.
        if self.config.reuse_stages_from and name not in self.config.stages and not own.exists():
            other = Path(self.config.reuse_stages_from) / folder
            if (other / "stage.json").is_file():
                return other
        return own

    def stage_done(self, name: str) -> Optional[dict]:
        path = self.stage_dir(name) / "stage.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _finish(self, name: str, summary: dict) -> dict:
        _on_rank0(lambda: atomic_write_json(self.stage_dir(name) / "stage.json", summary))
        return summary

    @property
    def framework(self) -> ConstitutionalFramework:
        # One framework scores revisions (stage 1), labels preference pairs (stage 2) and judges
        # the evaluation, so every stage is guided by the same reading of the constitution.
        if self._framework is None:
            cfg, names = self.config, self.config.evaluators
            if cfg.judge_model:  # a separate, frozen judge model (bf16 on CUDA; see load_judge)
                judge, judge_tok = cfg.judge_model, None
            else:
                judge, judge_tok = self.model_for(None) if "judge" in names else (None, None)
            self._framework = ConstitutionalFramework(
                self.constitution, classifier="default" if "classifier" in names else None,
                harm_judge="default" if "harm_judge" in names else None, refusal_classifier=cfg.refusal_classifier,
                judge_model=judge, judge_tokenizer=judge_tok, guard_model=cfg.guard_model or None,
                device=self.device)
        return self._framework

    def prompts(self, which: str, n: Optional[int], seed_offset: int = 0) -> List[str]:
        """`n` prompts of a data file, shuffled with the run's seed (n=None: all of them)."""
        path = _resolve(getattr(self.config.data, which))
        return _take(read_prompts(path), n, self.config.seed + seed_offset)

    def _save_model(self, model, tokenizer, folder: Path) -> None:
        _on_rank0(lambda: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))

    def model_for(self, stage: Optional[str]):
        """The model a stage starts from: the previous stage's output, or the base model."""
        path = self.config.model if stage is None else self.stage_dir(stage) / "model"
        return load_causal_lm(path, device=self.device, dtype=self.config.dtype)

    def reward_model_dir(self, required: bool = True) -> Path:
        """The reward model RL and evaluation use: `reward_model` if given, else stage 2's (which
        evaluation, `required=False`, may lack: its mean-reward column is then left out)."""
        if self.config.reward_model:
            folder = _resolve(self.config.reward_model)
            if not folder.is_dir():
                raise FileNotFoundError(f"reward_model: no folder at {self.config.reward_model}")
            return folder
        folder = self.stage_dir("reward") / "model"
        if required and not folder.is_dir() and "reward" not in self.config.stages:
            raise FileNotFoundError(f"no reward model at {folder}: run stage 2 in this run folder, or give one "
                                    "with reward_model (--reward-model DIR)")
        return folder

    # -- the run ------------------------------------------------------------------------------
    def run(self, on_stage: Optional[Callable[[str, dict], None]] = None) -> Dict[str, dict]:
        _on_rank0(lambda: atomic_write_text(self.run_dir / "config.yaml", _dump_yaml(to_dict(self.config))))
        results = {}
        for name in STAGES:
            if name not in self.config.stages:
                continue
            done = self.stage_done(name)
            if done is not None:
                log.info("stage %s already finished: skipping", name)
                results[name] = {**done, "skipped": True}
            else:
                seed_everything(self.config.seed)
                start = time.time()
                summary = getattr(self, f"run_{name}")()
                summary["seconds"] = round(time.time() - start, 1)
                results[name] = self._finish(name, summary)
            if on_stage:
                on_stage(name, results[name])
        return results

    def run_sft(self) -> dict:
        cfg, out = self.config, self.stage_dir("sft")
        model, tokenizer = self.model_for(None)
        data_file = out / "sft.jsonl"
        if data_file.is_file():  # generated before an interruption: reuse, don't regenerate
            records = read_jsonl(data_file)
            stats = json.loads((out / "critique_stats.json").read_text())
        else:
            prompts = self.prompts("train_prompts", cfg.data.num_sft_prompts)
            # All benign prompts, shuffled: stage 1 samples its helpful mix-in (critique.helpful_mix_fraction)
            # from them, so that share is not capped at num_sft_prompts benign prompts.
            benign = self.prompts("benign_train_prompts", None, seed_offset=1)
            with sharded_across_ranks():
                result = run_critique_revision(model, tokenizer, prompts, self.constitution, self.framework,
                                               cfg.critique, benign_prompts=benign)
            _on_rank0(lambda: (write_sft_dataset(result, out), atomic_write_json(out / "critique_stats.json", result.stats)))
            records, stats = result.sft_records, result.stats
        sft_cfg = dataclasses.replace(cfg.sft, output_dir=str(out / "checkpoints"),
                                      log_file=str(out / "metrics.jsonl"))
        trainer = SFTTrainer(model, tokenizer, sft_cfg)
        metrics = trainer.train(records, resume_from=latest_checkpoint(out / "checkpoints"))
        model = trainer.model  # after FSDP a new, plain model (parallel.Parallel.unwrap); else the same one
        self._save_model(merge_lora(model), tokenizer, out / "model")  # a plain HF model (a no-op without LoRA)
        return {"critique": stats, "train": _scalars(metrics)}

    def run_reward(self) -> dict:
        cfg, out = self.config, self.stage_dir("reward")
        model, tokenizer = self.model_for("sft" if "sft" in cfg.stages or self.stage_done("sft") else None)
        pairs_file = out / "pairs.jsonl"
        if cfg.data.num_preference_prompts == 0:  # human pairs only
            pairs, stats = [], {"pairs": 0}
        elif pairs_file.is_file():
            pairs = load_pairs(pairs_file)
            stats = json.loads((out / "preference_stats.json").read_text())
        else:
            prompts = self.prompts("train_prompts", cfg.data.num_preference_prompts, seed_offset=2)
            with sharded_across_ranks():
                pairs, stats = generate_preference_pairs(model, tokenizer, prompts, self.framework, cfg.preferences)
            _on_rank0(lambda: (write_pairs(pairs, pairs_file), atomic_write_json(out / "preference_stats.json", stats)))
        train_pairs = list(pairs)
        if cfg.data.human_pairs and cfg.data.num_human_pairs > 0:
            train_pairs += load_pairs(_resolve(cfg.data.human_pairs), limit=cfg.data.num_human_pairs, split="train")
        if cfg.data.stage1_pairs:
            more, stats["stage1_pairs"] = self._stage1_pairs()
            train_pairs += more
        random.Random(cfg.seed).shuffle(train_pairs)
        # built whole, then cut (not from_causal_lm(keep_layers=)): the head's random init must follow
        # the same RNG draws as before, so default numbers do not move
        reward_model = RewardModel.from_causal_lm(model, device=self.device, dtype=cfg.dtype).keep_bottom_layers(
            cfg.reward.keep_layers)
        del model
        rm_cfg = dataclasses.replace(cfg.reward, output_dir=str(out / "checkpoints"),
                                     log_file=str(out / "metrics.jsonl"))
        trainer = RewardTrainer(reward_model, tokenizer, rm_cfg)
        metrics = trainer.train(train_pairs, resume_from=latest_checkpoint(out / "checkpoints"))
        reward_model = trainer.model  # after FSDP a new, plain model (parallel.Parallel.unwrap); else the same one
        _on_rank0(lambda: reward_model.save_pretrained(out / "model", tokenizer=tokenizer))
        summary = {"preferences": stats, "num_train_pairs": len(train_pairs), "train": _scalars(metrics)}
        eval_file = _resolve(cfg.data.reward_eval_pairs)
        if eval_file is not None:
            if not eval_file.is_file():  # a figure silently missing from the report is worse than a stop
                raise FileNotFoundError(f"data.reward_eval_pairs: {eval_file} not found")
            held = load_pairs(eval_file)
            summary["human_heldout"] = {"pairs": len(held), **_scalars(trainer.evaluate(held))}
        return summary

    def _stage1_pairs(self):
        sft = self.stage_dir("sft")
        if not (sft / "audit.jsonl").is_file() or not (sft / "sft.jsonl").is_file():
            raise FileNotFoundError(f"data.stage1_pairs: no stage-1 audit.jsonl and sft.jsonl in {sft} (run stage 1 "
                                    "first, or reuse_stages_from a run that has)")
        return stage1_pairs(read_jsonl(sft / "audit.jsonl"), read_jsonl(sft / "sft.jsonl"),
                            self.constitution.safe_responses, seed=self.config.seed)

    def run_rl(self) -> dict:
        cfg, out = self.config, self.stage_dir("rl")
        policy, tokenizer = self.model_for("sft" if self.stage_done("sft") else None)
        if cfg.rl.algorithm == "dpo":
            return self._run_dpo(policy, tokenizer, out)
        reward_model = RewardModel.from_pretrained(self.reward_model_dir(), device=self.device, dtype=cfg.dtype)
        algo_config = getattr(cfg.rl, cfg.rl.algorithm)
        value_model = (ValueModel.from_causal_lm(policy, device=self.device, dtype=cfg.dtype,
                                                 keep_layers=algo_config.value_keep_layers)
                       if cfg.rl.algorithm == "ppo" else None)
        prompts, kinds = self._rl_prompt_pool()
        judge = None
        judge_weight = cfg.rl.judge_reward_weight or algo_config.judge_reward_weight  # either field turns it on
        if judge_weight:  # the prompt files say which prompts are harmful and which benign
            judge = RuleBasedReward(self.framework, kinds_by_prompt=kinds,
                                    overrefusal_penalty=cfg.rl.judge_overrefusal_penalty)
            algo_config = dataclasses.replace(algo_config, judge_reward_weight=judge_weight)
        trainer = make_rl_trainer(cfg.rl.algorithm, policy, tokenizer, reward_model, self.device,
                                  config=algo_config, value_model=value_model, judge_reward=judge)
        result = trainer.train(prompts, num_steps=cfg.rl.steps, batch_size=cfg.rl.batch_size,
                               num_epochs_per_batch=cfg.rl.num_epochs_per_batch, max_length=cfg.rl.max_new_tokens,
                               temperature=cfg.rl.temperature, checkpoint_dir=str(out / "checkpoints"),
                               checkpoint_freq=cfg.rl.checkpoint_freq,
                               resume_from=latest_checkpoint(out / "checkpoints"))
        _on_rank0(lambda: atomic_write_jsonl(out / "metrics.jsonl", result.get("history", [])))
        self._save_model(merge_lora(policy), tokenizer, out / "model")  # a plain HF model (a no-op without LoRA)
        return {"algorithm": cfg.rl.algorithm, "final_stats": _scalars(result.get("final_stats", {}))}

    def _rl_prompt_pool(self):
        """Stage 3's prompts and their kinds: red-team prompts, then benign ones (data.num_rl_*)."""
        cfg = self.config
        prompts = self.prompts("train_prompts", cfg.data.num_rl_prompts, seed_offset=3)
        kinds = {p: "harmful" for p in prompts}
        if cfg.data.num_rl_benign_prompts:  # without them RL only ever sees requests to refuse
            benign = self.prompts("benign_train_prompts", cfg.data.num_rl_benign_prompts, seed_offset=4)
            kinds.update({p: "benign" for p in benign})
            prompts = prompts + benign
        return prompts, kinds

    def _judged_pairs(self, policy, tokenizer, out: Path):
        """rl.dpo_pairs=judged: sampled once from the starting policy, kept in judged_pairs.jsonl (a
        resumed run reads them back instead of sampling again)."""
        cfg, pairs_file, stats_file = self.config, out / "judged_pairs.jsonl", out / "judged_pairs_stats.json"
        if pairs_file.is_file() and stats_file.is_file():
            return load_pairs(pairs_file), json.loads(stats_file.read_text())
        prompts, kinds = self._rl_prompt_pool()
        judge = RuleBasedReward(self.framework, kinds_by_prompt=kinds)
        generation = GenerationConfig(max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
                                      batch_size=cfg.evaluation.batch_size)
        # every rank samples the same answers (same seed), so every rank trains on the same pairs
        pairs, stats = judged_pairs(policy, tokenizer, prompts, judge, generation, cfg.rl.dpo_samples_per_prompt,
                                    self.constitution.safe_responses, seed=cfg.seed)
        _on_rank0(lambda: (write_pairs(pairs, pairs_file), atomic_write_json(stats_file, stats)))
        return pairs, stats

    def _run_dpo(self, policy, tokenizer, out: Path) -> dict:
        """DPO on preference pairs (rl.dpo_pairs): stage 2's (AI-labelled, plus any human pairs), stage 1's
        decisions (a constitution-approved revision or written refusal > the first answer; the model's
        own answer to a benign prompt > a written refusal), both, or judged (the starting policy's own
        samples on the RL prompt pool, best > worst by the rule-based judge, balanced by kind)."""
        cfg, pairs, sources = self.config, [], {}
        if cfg.rl.dpo_pairs in ("preferences", "both"):
            ai_pairs = self.stage_dir("reward") / "pairs.jsonl"
            pairs = load_pairs(ai_pairs) if ai_pairs.is_file() else []
            if cfg.data.human_pairs and cfg.data.num_human_pairs > 0:
                pairs += load_pairs(_resolve(cfg.data.human_pairs), limit=cfg.data.num_human_pairs, split="train")
            sources["preferences"] = len(pairs)
            if not pairs:
                raise FileNotFoundError(f"DPO needs preference pairs: none at {ai_pairs} (run stage 2) and no human "
                                        "pairs (data.human_pairs, data.num_human_pairs); or set rl.dpo_pairs=stage1")
        if cfg.rl.dpo_pairs in ("stage1", "both"):
            more, sources["stage1"] = self._stage1_pairs()
            pairs += more
            if not more:
                raise ValueError(f"rl.dpo_pairs={cfg.rl.dpo_pairs}: stage 1 in {self.stage_dir('sft')} decided no "
                                 "pairs (no revised answers and no benign mix-in)")
        if cfg.rl.dpo_pairs == "judged":
            pairs, sources["judged"] = self._judged_pairs(policy, tokenizer, out)
            if not pairs:
                raise ValueError("rl.dpo_pairs=judged: the judge scored every sample of every prompt alike, so "
                                 "there is nothing to prefer (more rl prompts or rl.dpo_samples_per_prompt)")
            if cfg.rl.dpo_benign_ratio is not None:
                pairs = balance_judged_pairs(pairs, cfg.rl.dpo_benign_ratio, seed=cfg.seed)
                sources["judged"] = {**sources["judged"], "pairs_after_balancing": len(pairs)}
        dpo_cfg = dataclasses.replace(cfg.rl.dpo, checkpoint_dir=str(out / "checkpoints"),
                                      log_file=str(out / "metrics.jsonl"))
        trainer = DPOTrainer(policy, tokenizer, dpo_cfg, device=self.device)
        result = trainer.train(pairs, resume_from=latest_checkpoint(out / "checkpoints"))
        policy = trainer.policy  # after FSDP a new, plain model (parallel.Parallel.unwrap); else the same one
        self._save_model(policy, tokenizer, out / "model")
        return {"algorithm": "dpo", "num_pairs": len(pairs), "pair_sources": sources,
                "final_stats": _scalars(result.get("final_stats", {}))}

    def benchmark_refusal_judge(self):
        """The refusal judge of the benchmarks: a callable (prompts, answers) -> one of
        full_compliance / partial_refusal / full_refusal per answer. None: the framework's refusal
        class (benchmarks.FrameworkRefusalJudge), i.e. the `refusal_classifier` of the config. Another
        judge (a stronger classifier, a chat model) plugs in here."""
        return None

    def run_evaluate(self) -> dict:
        with sharded_across_ranks():  # every answer generated once, over all ranks; rank 0 writes
            return self._evaluate()

    def _evaluate(self) -> dict:
        cfg, out = self.config, self.stage_dir("evaluate")
        main = ddp.is_main_process()
        from .stages.benchmarks import load_benchmark, run_benchmark, write_comparison
        benchmarks = [load_benchmark(_resolve(b) if str(b).endswith((".csv", ".jsonl")) else b,
                                     limit=cfg.evaluation.benchmark_limit) for b in cfg.evaluation.benchmarks]
        bench_gen = GenerationConfig(max_new_tokens=cfg.evaluation.benchmark_max_new_tokens, do_sample=False,
                                     batch_size=cfg.evaluation.batch_size)
        bench_results = {b.name: {} for b in benchmarks}  # benchmark -> model -> BenchmarkResult
        n = cfg.data.num_eval_prompts
        prompt_sets = {
            "harmful": (self.prompts("eval_harmful_prompts", n, seed_offset=4), "harmful"),
            "benign": (self.prompts("eval_benign_prompts", n, seed_offset=5), "benign"),
        }
        reward_dir = self.reward_model_dir(required=False)
        reward_model = RewardModel.from_pretrained(reward_dir, device=self.device) if reward_dir.is_dir() else None
        gen = GenerationConfig(max_new_tokens=cfg.evaluation.max_new_tokens, do_sample=False,
                               batch_size=cfg.evaluation.batch_size)
        reports = {}
        for name, stage in (("base", None), ("sft", "sft"), ("rl", "rl")):
            if name not in cfg.evaluation.models:
                continue
            if stage is not None and not (self.stage_dir(stage) / "model").is_dir():
                continue
            model, tokenizer = self.model_for(stage)
            report = evaluate_model(model, tokenizer, prompt_sets, self.framework, gen_config=gen,
                                    reward_model=reward_model)
            if main:
                report.write(out / name)
            reports[name] = report
            for bench in benchmarks:
                result = run_benchmark(model, tokenizer, bench, self.framework, bench_gen,
                                       refusal_judge=self.benchmark_refusal_judge(), model_name=name)
                if main:
                    result.write(out / "benchmarks" / bench.name / name)
                bench_results[bench.name][name] = result
            del model
        for bench_name, named in bench_results.items():
            if len(named) > 1 and main:
                write_comparison(out / "benchmarks" / bench_name, bench_name, named)
        from .stages.report import write_run_report
        if main:
            write_run_report(self.run_dir, reports, self.config, num_examples=cfg.evaluation.num_examples,
                             benchmarks=bench_results)
        return {"models": list(reports), "summary": {k: r.summary for k, r in reports.items()},
                "comparison": compare_reports(reports),
                "benchmarks": {b: {m: r.summary for m, r in named.items()} for b, named in bench_results.items()}}


def _on_rank0(write: Callable[[], object]) -> None:
    """Under torchrun only rank 0 writes the run folder, and no rank goes on (or reads it back) before
    the write is done; in one process this just writes."""
    if ddp.is_main_process():
        write()
    ddp.barrier()


def _scalars(d: dict) -> dict:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}


def _dump_yaml(data: dict) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_pipeline_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                         overrides: Optional[List[str]] = None) -> PipelineConfig:
    """Preset YAML (configs/<preset>.yaml), then a user YAML file, then dotted overrides."""
    from .common.config import apply_overrides, deep_merge, load_yaml

    data: dict = {}
    if preset:
        preset_file = REPO_ROOT / "configs" / f"{preset}.yaml"
        if not preset_file.is_file():
            known = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml"))
            raise ValueError(f"unknown preset {preset!r} (known: {', '.join(known)})")
        data = load_yaml(preset_file)
        data.setdefault("preset", preset)
    if config_file:
        data = deep_merge(data, load_yaml(config_file))
    data = apply_overrides(data, overrides or [])
    return from_dict(PipelineConfig, data)


def print_stage_line(name: str, summary: dict) -> None:
    """The one-line summary per stage printed by the CLI."""
    from .stages.report import stage_summary_line

    folder = {"sft": "stage1_sft", "reward": "stage2_reward", "rl": "stage3_rl", "evaluate": "evaluation"}[name]
    state = "skipped (already done)" if summary.get("skipped") else f"{summary.get('seconds', '?')} s"
    print(f"[{name}] {state}: {stage_summary_line(folder, summary)}", flush=True)
    if name == "evaluate" and "comparison" in summary:
        print(summary["comparison"], flush=True)
