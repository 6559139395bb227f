"""The constitution and everything that judges an answer against it: the principles (constitution),
the evaluators (evaluators/), the framework that combines them (framework), the RL judge term
(judge_reward) and agreement with human labels (judge_report). Imports `common` and `training`."""
