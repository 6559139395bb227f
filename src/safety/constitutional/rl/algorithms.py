"""One entry point for the online RL algorithms, so the pipeline can swap them by name.

    trainer = make_rl_trainer("grpo", policy, tokenizer, reward_model, device="cpu",
                              config={"group_size": 4, "learning_rate": 1e-6})
    trainer.train(prompts, num_steps=..., batch_size=..., num_epochs_per_batch=..., max_length=...,
                  temperature=..., checkpoint_dir=..., checkpoint_freq=..., resume_from=...)

Every trainer it returns is an `rl.online_trainer.OnlineRLTrainer` (PPO with a critic, the others
without): one `train(...)` signature and checkpoint format. DPO is
offline (preference pairs, no rollouts) and lives in `dpo.py`.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Mapping, Optional, Union

from torch import nn

from .online_trainer import OnlineRLTrainer
from .online_trainer import OnlineRLConfig
from .policy_gradient import CONFIG_CLASSES, PolicyGradientTrainer
from .ppo_trainer import PPOConfig, PPOTrainer

RL_ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce")
CONFIG_FOR = {"ppo": PPOConfig, **CONFIG_CLASSES}


def make_config(algorithm: str, config: Union[None, Mapping, OnlineRLConfig] = None):
    """The algorithm's config dataclass from None (its defaults), a dict of fields, or a config object.

    A config of another algorithm's class is converted field by field (fields the target lacks are
    dropped; its own defaults fill the rest), so a `PPOConfig` from a YAML file can drive GRPO (less
    its critic fields).
    """
    if algorithm not in RL_ALGORITHMS:
        raise ValueError(f"unknown RL algorithm {algorithm!r}; choose one of {RL_ALGORITHMS}")
    cls = CONFIG_FOR[algorithm]
    if config is None:
        return cls()
    if isinstance(config, cls) and type(config) is cls:
        return config
    values = dict(config) if isinstance(config, Mapping) else asdict(config)
    known = {f.name for f in fields(cls)}
    if isinstance(config, Mapping):
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
    else:  # another config class: keep only what was changed from that class's defaults
        defaults = asdict(type(config)())
        values = {k: v for k, v in values.items() if k in known and v != defaults.get(k)}
    values.pop("algorithm", None)
    return cls(**values)


def make_rl_trainer(algorithm: str, policy: nn.Module, tokenizer, reward_model: nn.Module, device=None,
                    config: Union[None, Mapping, OnlineRLConfig] = None, value_model: Optional[nn.Module] = None,
                    ref_model: Optional[nn.Module] = None, reward_tokenizer=None, judge_reward=None) -> OnlineRLTrainer:
    """A trainer for "ppo" | "grpo" | "rloo" | "reinforce" with a shared `train(...)` signature.

    `value_model` is used by PPO only (None: PPO builds one on a copy of the policy's backbone);
    the critic-free algorithms reject one. `judge_reward`: the optional judge hook (see PPOTrainer),
    scaled by the config's `judge_reward_weight`.
    """
    cfg = make_config(algorithm, config)
    if algorithm == "ppo":
        return PPOTrainer(policy, value_model, reward_model, tokenizer, device, config=cfg, ref_model=ref_model,
                          reward_tokenizer=reward_tokenizer, judge_reward=judge_reward)
    if value_model is not None:
        raise ValueError(f"{algorithm} uses no value model: pass value_model=None")
    return PolicyGradientTrainer(policy, reward_model, tokenizer, device, config=cfg, ref_model=ref_model,
                                 reward_tokenizer=reward_tokenizer, judge_reward=judge_reward)


__all__ = ["RL_ALGORITHMS", "CONFIG_FOR", "make_config", "make_rl_trainer"]
