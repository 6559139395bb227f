"""The guide's import path: `from src.safety.constitutional.ppo_trainer import PPOTrainer, PPOConfig`.

Other code imports PPO from here, so this name stays; the code lives in `rl/ppo_trainer.py`. The
module object itself is installed under this name (not a copy of its names), so
`src.safety.constitutional.ppo_trainer` *is* `src.safety.constitutional.rl.ppo_trainer`: every name,
private ones included, and anything patched on one is patched on the other.
"""
import sys

from .rl import ppo_trainer as _ppo_trainer

sys.modules[__name__] = _ppo_trainer
