"""A rule-based reward from the refusal/harm judge, added to the reward model's score during RL.

As in rule-based rewards for safety (Mu et al. 2024, "Rule Based Rewards for Language Model
Safety", OpenAI): the reward model judges overall quality, and a small hand-written table over the
judge's verdicts says what a safe answer does on each kind of prompt. The trainers add
`judge_reward_weight * RuleBasedReward(...)(prompts, answers)` to each raw reward-model score before
they normalise it (`PPOTrainer(..., judge_reward=...)`, `PPOConfig.judge_reward_weight`, 0 = off).

The table (times `weight`), from the framework's refusal class and harmful flag:

    prompt kind   full_refusal   partial_refusal               full_compliance
    harmful       +1             +0.5 if not harmful else -0.5   -1 if harmful else 0
    benign        -1             -0.5                          0

`overrefusal_penalty` (default 1) multiplies the benign rows: above 1, refusing a benign prompt costs
more than refusing a harmful one earns, so on a balanced prompt pool "refuse everything" scores below
"change nothing" and only telling the two apart pays (docs/safety_effect.md, run D).

On a harmful prompt refusing is right; a partial refusal earns half unless what it does say is
harmful; complying is punished only when the answer is judged harmful (a safe, helpful answer to a
borderline request is left to the reward model). On a benign prompt refusing is over-refusal; a
compliant answer gets no bonus, because the reward model already judges helpfulness.

The refusal class comes from `framework.refusal_classes` (the learned 3-class classifier when the
framework has one; the rules' regexes otherwise, which never say partial_refusal); `harmful` from
`framework.evaluate_batch(..., kinds=...)`, asked only where it matters (harmful prompts whose
answer is not a full refusal). The prompt kind comes from `kinds_by_prompt` when given (the caller
knows which prompt files are red-team prompts), else from `framework.prompt_kind`.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

__all__ = ["RULES", "RuleBasedReward", "rule_reward"]

KINDS = ("harmful", "benign")

# (prompt kind, refusal class) -> (reward if the answer is not harmful, reward if it is)
RULES: Dict[tuple, tuple] = {
    ("harmful", "full_refusal"): (1.0, 1.0),
    ("harmful", "partial_refusal"): (0.5, -0.5),
    ("harmful", "full_compliance"): (0.0, -1.0),
    ("benign", "full_refusal"): (-1.0, -1.0),
    ("benign", "partial_refusal"): (-0.5, -0.5),
    ("benign", "full_compliance"): (0.0, 0.0),
}


def rule_reward(kind: str, refusal_class: str, harmful: bool) -> float:
    """One cell of the table above (unweighted)."""
    try:
        safe, unsafe = RULES[(kind, refusal_class)]
    except KeyError:
        raise ValueError(f"no rule for prompt kind {kind!r} and refusal class {refusal_class!r}: kinds are "
                         f"{KINDS}, refusal classes full_compliance | partial_refusal | full_refusal") from None
    return unsafe if harmful else safe


class RuleBasedReward:
    """Callable (prompt_texts, answer_texts) -> tensor (batch,) of `weight * rule_reward(...)`.

    `framework`: a ConstitutionalFramework (or anything with `refusal_classes`, `evaluate_batch` and
    `prompt_kind`). `kinds_by_prompt`: prompt text -> "harmful" | "benign"; prompts not in it are
    classified by `framework.prompt_kind`. `last_details` keeps the last call's (kind, refusal
    class, harmful) per answer, for inspection.
    """

    def __init__(self, framework, kinds_by_prompt: Optional[Mapping[str, str]] = None, weight: float = 1.0,
                 overrefusal_penalty: float = 1.0):
        if not overrefusal_penalty >= 0:
            raise ValueError(f"overrefusal_penalty must be >= 0, got {overrefusal_penalty!r}")
        bad = {k for k in (kinds_by_prompt or {}).values() if k not in KINDS}
        if bad:
            raise ValueError(f"kinds_by_prompt values must be 'harmful' or 'benign', got {sorted(bad)}")
        self.framework = framework
        self.kinds_by_prompt = dict(kinds_by_prompt or {})
        self.weight = float(weight)
        self.overrefusal_penalty = float(overrefusal_penalty)
        self.last_details: List[tuple] = []

    def kind(self, prompt: str) -> str:
        kind = self.kinds_by_prompt.get(prompt)
        return kind if kind is not None else self.framework.prompt_kind(prompt)

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        kinds = [self.kind(p) for p in prompts]
        classes = list(self.framework.refusal_classes(prompts, answers))
        # the harmful flag changes the reward only for a harmful prompt's non-refusals: judge just those
        need = [i for i, (k, c) in enumerate(zip(kinds, classes)) if k == "harmful" and c != "full_refusal"]
        harmful = [False] * len(answers)
        if need:
            results = self.framework.evaluate_batch([prompts[i] for i in need], [answers[i] for i in need],
                                                    kinds=["harmful"] * len(need))
            for i, result in zip(need, results):
                harmful[i] = bool(result.harmful)
        self.last_details = list(zip(kinds, classes, harmful))
        values = [self.weight * rule_reward(k, c, h) * (self.overrefusal_penalty if k == "benign" else 1.0)
                  for k, c, h in self.last_details]
        return torch.tensor(values, dtype=torch.float32)
