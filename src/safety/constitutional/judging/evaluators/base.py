"""What every evaluator provides: per-principle scores for a batch, and soft pairwise comparisons.

An evaluator scores (prompt, response) pairs against principles: 0..1, higher = complies better.
`compare_batch` gives P(response a complies better than b) per principle; the default derives it
from the two scores with a logistic, which is symmetric (p(a, b) + p(b, a) == 1) by construction.
Evaluators that compare directly (the model judge) override it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass
class PrincipleScore:
    score: float        # 0..1, higher = complies better
    passed: bool
    reason: str
    applicable: bool = True  # False: the principle is not judged on this kind of prompt


PASS_THRESHOLD = 0.5


def make_score(score: float, reason: str, threshold: float = PASS_THRESHOLD) -> PrincipleScore:
    score = float(min(1.0, max(0.0, score)))
    return PrincipleScore(score, score >= threshold, reason)


class Evaluator:
    """Base class. `weight` is this evaluator's share when several judge the same principle."""

    name: str = "evaluator"
    weight: float = 1.0
    # Steepness of the logistic that turns a score difference into a preference probability.
    compare_scale: float = 8.0

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str],
                    principles: Sequence, kinds: Optional[Sequence[Optional[str]]] = None
                    ) -> List[List[PrincipleScore]]:
        """Scores indexed [item][principle]."""
        raise NotImplementedError

    def compare_batch(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                      principles: Sequence, kinds: Optional[Sequence[Optional[str]]] = None
                      ) -> List[List[float]]:
        """P(a better than b) indexed [item][principle]."""
        a = self.score_batch(prompts, responses_a, principles, kinds)
        b = self.score_batch(prompts, responses_b, principles, kinds)
        return [[_sigmoid(self.compare_scale * (sa.score - sb.score)) for sa, sb in zip(row_a, row_b)]
                for row_a, row_b in zip(a, b)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def prompt_text(prompt) -> str:
    """A prompt as plain text: a string as is; chat messages as their user turns, joined."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") == "user")
