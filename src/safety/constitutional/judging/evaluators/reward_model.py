"""A trained scalar reward model as an evaluator (stage 2's output, or any one-label HF classifier).

A Bradley-Terry reward model already gives what a comparison needs: P(a better than b) =
sigmoid(r_a - r_b). It judges the answer as a whole, not one principle, so the constitution lists
it only for general principles (`harmless`); on each of those it gives the same number.
An answer's own score is sigmoid((r - mean) / std) with the mean/std saved beside the model
(`RewardModel.reward_stats`, measured on its evaluation pairs), so 0.5 is an average answer.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

from .base import Evaluator, PrincipleScore, make_score


class RewardModelEvaluator(Evaluator):
    name = "reward_model"
    weight = 2.0

    def __init__(self, reward_model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None,
                 weight: Optional[float] = None):
        self.reward_model, self.tokenizer = reward_model, tokenizer
        # Score with the context the model was trained on (the trainer saves it), else 512 tokens.
        trained = getattr(reward_model.config, "reward_max_length", None)
        self.batch_size, self.max_length = batch_size, max_length or trained or 512
        if weight is not None:
            self.weight = weight
        stats = reward_model.reward_stats
        self.mean, self.std = stats if stats is not None else (0.0, 1.0)

    @classmethod
    def load(cls, path, device=None, **kwargs) -> "RewardModelEvaluator":
        """A reward-model directory as written by stage 2 / scripts/train_reward_model.py."""
        from src.models import load_tokenizer
        from src.models.heads import RewardModel

        model = RewardModel.from_pretrained(path, device=device)
        return cls(model, load_tokenizer(path), **kwargs)

    def rewards(self, prompts: Sequence, responses: Sequence[str]) -> List[float]:
        from ...training.reward_scoring import reward_scores  # lazy: evaluation imports the framework, which imports us

        return reward_scores(self.reward_model, self.tokenizer, prompts, responses, batch_size=self.batch_size,
                             max_length=self.max_length)

    def score_batch(self, prompts, responses, principles, kinds=None) -> List[List[PrincipleScore]]:
        rows = []
        for r in self.rewards(prompts, responses):
            z = (r - self.mean) / (self.std or 1.0)
            score = make_score(1.0 / (1.0 + math.exp(-z)), f"reward model: {r:+.2f} ({z:+.1f} sd)")
            rows.append([score for _ in principles])
        return rows

    def compare_batch(self, prompts, responses_a, responses_b, principles, kinds=None) -> List[List[float]]:
        prompts = list(prompts)
        rewards = self.rewards(prompts + prompts, list(responses_a) + list(responses_b))
        n = len(prompts)
        return [[1.0 / (1.0 + math.exp(-(rewards[i] - rewards[n + i])))] * len(principles) for i in range(n)]
