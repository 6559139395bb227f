"""The pipeline's data-producing stages: critique and revision (stage 1's SFT data), AI-feedback
preference pairs (stage 2's data), evaluation and the built-in benchmarks (stage 4), and the run
report. The trainers they feed live in `training` (SFT, reward model) and `rl` (stage 3)."""
