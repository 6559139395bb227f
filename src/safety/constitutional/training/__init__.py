"""What the trainers share, and the two supervised trainers: the one generation path (generation),
the one log-prob path (logprobs), AdamW and the schedule (optim), the guarded optimiser step
(guarded_step), the one step loop (loop); SFT (sft) and the Bradley-Terry reward model
(reward_training). Imports only `common`."""
