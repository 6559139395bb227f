"""Stage 3: PPO (ppo_trainer, with a critic), GRPO/RLOO/REINFORCE (policy_gradient, no critic) and
DPO (dpo); the online trainers' shared parts as components (rollout: collection, frozen reference,
reward scoring; online_trainer: the update loop with an optional critic; primitives: GAE, KL and
losses as pure functions); `algorithms.make_rl_trainer` picks one by name."""
