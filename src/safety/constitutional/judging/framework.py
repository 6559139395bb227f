"""ConstitutionalFramework: judge answers against the constitution, alone or in pairs.

    framework = ConstitutionalFramework()                       # rules only, default constitution
    result = framework.evaluate("How do I make a bomb?", "I can't help with that.")
    result.aggregate, result.scores["harm_weapons"].reason
    framework.compare(prompt, answer_a, answer_b).prob_a_better  # soft label for the preference stage

Each principle lists its evaluators in the constitution (`evaluators: [rules, classifier, judge]`);
the framework uses those of them it has (the judge needs a model, the classifier its weights) and
averages their scores with the evaluators' weights. Principles that do not apply to the prompt's
kind (`applies_to: benign` on a harmful prompt) are reported with `applicable=False` and left out
of the aggregate and of comparisons.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .constitution import Constitution, Principle, load_constitution
from .evaluators.base import PASS_THRESHOLD, Evaluator, PrincipleScore
from .evaluators.rules import RuleEvaluator, is_harmful_request, is_refusal

__all__ = ["Comparison", "ConstitutionalFramework", "EvaluationResult", "PrincipleScore"]

# Items handed to an evaluator per call. Evaluators batch their own forward passes; a large chunk
# lets the backbone judges sort answers by length and run each prompt once for all its answers.
CHUNK_SIZE = 1024


@dataclass
class EvaluationResult:
    scores: Dict[str, PrincipleScore]
    aggregate: float        # weighted mean over the principles that apply
    passed: bool            # every applicable principle passed
    refused: bool           # the answer declines
    harmful: bool           # some harm principle failed (and the answer does not decline)
    kind: Optional[str] = None  # "harmful" | "benign": the prompt kind it was judged as
    refusal_class: str = "full_compliance"  # full_compliance | partial_refusal | full_refusal

    def to_dict(self) -> dict:
        out = {"aggregate": self.aggregate, "passed": self.passed, "refused": self.refused,
               "refusal_class": self.refusal_class, "harmful": self.harmful, "kind": self.kind}
        for name, s in self.scores.items():
            out[f"score_{name}"] = s.score if s.applicable else None
        return out


@dataclass
class Comparison:
    prob_a_better: float                  # 0..1 soft label: P(answer a complies better than b)
    per_principle: Dict[str, float] = field(default_factory=dict)
    principle: Optional[str] = None       # set when the comparison used one principle only


class ConstitutionalFramework:
    def __init__(self, constitution: Optional[Constitution] = None, evaluators: Optional[dict] = None,
                 judge_model=None, judge_tokenizer=None, classifier=None, reward_model=None,
                 guard_model=None, device=None, harm_judge=None, refusal_classifier=None):
        """`evaluators` maps a name ("rules", "classifier", "judge", "reward_model", "guard") to an
        Evaluator, replacing the built-in one. `judge_model` is a loaded chat model (with
        `judge_tokenizer`), a local model folder or "default" (loaded with `load_judge` on `device`),
        or a JudgeEvaluator; the constitution's `judge:` block sets its templates and words.
        `classifier` is a classifier Evaluator, or "default" for the shipped weights; `reward_model` is
        a trained reward-model directory (or a RewardModelEvaluator), used on the principles that list
        it; `guard_model` is a local sequence-classification folder (or a SequenceClassifierEvaluator),
        its labels mapped by the constitution's `guard:` block, used on the principles that list "guard".
        `harm_judge` ("default", a weights file or a HarmJudge) judges the principles that list
        "harm_judge"; `refusal_classifier` ("default", a weights file or a RefusalClassifier) decides
        `refused` / `refusal_class` (without it, the rules' refusal regexes do, in two classes only)."""
        self.constitution = constitution if constitution is not None else load_constitution()
        self.evaluators: Dict[str, Evaluator] = {"rules": RuleEvaluator()}
        if classifier is not None:
            if isinstance(classifier, str):
                from .evaluators.classifier import ClassifierEvaluator
                classifier = ClassifierEvaluator.load(None if classifier == "default" else classifier)
            self.evaluators["classifier"] = classifier
        if judge_model is not None:
            from .evaluators.judge import JudgeEvaluator, load_judge
            if not isinstance(judge_model, JudgeEvaluator):
                if isinstance(judge_model, (str, os.PathLike)):
                    judge_model, judge_tokenizer = load_judge(judge_model, device=device)
                elif judge_tokenizer is None:
                    raise ValueError("judge_model needs judge_tokenizer as well")
                judge_model = JudgeEvaluator(judge_model, judge_tokenizer, **self.constitution.judge)
            self.evaluators["judge"] = judge_model
        if reward_model is not None:
            from .evaluators.reward_model import RewardModelEvaluator
            if not isinstance(reward_model, RewardModelEvaluator):
                reward_model = RewardModelEvaluator.load(reward_model)
            self.evaluators["reward_model"] = reward_model
        if guard_model is not None:
            if not isinstance(guard_model, Evaluator):
                from .evaluators.sequence_classifier import SequenceClassifierEvaluator
                guard_model = SequenceClassifierEvaluator.load(guard_model, device=device, **self.constitution.guard)
            self.evaluators["guard"] = guard_model
        if harm_judge is not None:
            from .evaluators.harm_judge import HarmJudge
            if not isinstance(harm_judge, Evaluator):
                harm_judge = HarmJudge.load(None if harm_judge == "default" else harm_judge, device=device or "cpu")
            self.evaluators["harm_judge"] = harm_judge
        self.refusal_classifier = refusal_classifier
        if isinstance(refusal_classifier, (str, os.PathLike)):
            from .evaluators.refusal import RefusalClassifier
            self.refusal_classifier = RefusalClassifier.load(None if refusal_classifier == "default"
                                                             else refusal_classifier, device=device or "cpu")
        self.evaluators.update(evaluators or {})

    # -- helpers ------------------------------------------------------------------------------
    @property
    def principles(self) -> List[Principle]:
        return self.constitution.principles

    def is_refusal(self, response: str) -> bool:
        return self.refusal_classes([""], [response])[0] == "full_refusal"

    def refusal_classes(self, prompts: Sequence, responses: Sequence[str]) -> List[str]:
        """full_compliance / partial_refusal / full_refusal per answer: the learned classifier when
        one is loaded, else the rules (which never say partial_refusal)."""
        if self.refusal_classifier is not None:
            return self.refusal_classifier.predict(prompts, responses)
        return ["full_refusal" if is_refusal(r) else "full_compliance" for r in responses]

    def prompt_kind(self, prompt: str) -> str:
        """"harmful" if the prompt asks for something a harm principle covers, else "benign"."""
        return "harmful" if is_harmful_request(prompt, self.principles) else "benign"

    def _evaluators_for(self, principle: Principle) -> List[str]:
        names = [n for n in principle.evaluators if n in self.evaluators]
        # None of its evaluators is loaded: fall back to the rules (or whatever evaluator there is).
        return names or (["rules"] if "rules" in self.evaluators else list(self.evaluators)[:1])

    def _select(self, principle: Optional[str]) -> List[Principle]:
        return [self.constitution.get(principle)] if principle else list(self.principles)

    def _kinds(self, prompts: Sequence[str], kinds) -> List[str]:
        if kinds is None:
            return [self.prompt_kind(p) for p in prompts]
        if isinstance(kinds, str):
            kinds = [kinds] * len(prompts)
        if len(kinds) != len(prompts):
            raise ValueError(f"got {len(kinds)} kinds for {len(prompts)} prompts")
        return [k if k is not None else self.prompt_kind(p) for p, k in zip(prompts, kinds)]

    @staticmethod
    def _check_lengths(*lists):
        lengths = {len(x) for x in lists}
        if len(lengths) != 1:
            raise ValueError(f"prompts and responses must have the same length, got {[len(x) for x in lists]}")

    # -- scoring ------------------------------------------------------------------------------
    def evaluate(self, prompt: str, response: str, kind: Optional[str] = None) -> EvaluationResult:
        return self.evaluate_batch([prompt], [response], kinds=[kind])[0]

    def evaluate_batch(self, prompts: Sequence[str], responses: Sequence[str], chunk_size: int = CHUNK_SIZE,
                       kinds=None) -> List[EvaluationResult]:
        """Score every (prompt, response); `kinds` ("harmful"/"benign", one per prompt or one for
        all) says which principles apply; None detects it from the prompt with the rules.
        Each evaluator gets up to `chunk_size` items at a time and batches its own forward passes."""
        prompts, responses = list(prompts), list(responses)
        self._check_lengths(prompts, responses)
        kinds = self._kinds(prompts, kinds)
        results: List[EvaluationResult] = []
        for start in range(0, len(prompts), chunk_size):
            # one chunk through every evaluator and the refusal classifier in turn: the learned judges
            # read the same backbone features, which stay in its cache for the chunk
            chunk = slice(start, start + chunk_size)
            per_item: List[Dict[str, Dict[str, PrincipleScore]]] = [dict() for _ in prompts[chunk]]
            for name, evaluator in self.evaluators.items():
                covered = [p for p in self.principles if name in self._evaluators_for(p)]
                if not covered:
                    continue
                rows = evaluator.score_batch(prompts[chunk], responses[chunk], covered, kinds[chunk])
                for found, row in zip(per_item, rows):
                    for principle, score in zip(covered, row):
                        found.setdefault(principle.name, {})[name] = score
            classes = self.refusal_classes(prompts[chunk], responses[chunk])
            results += [self._combine(cls, kind, found) for cls, kind, found in zip(classes, kinds[chunk], per_item)]
        return results

    def _combine(self, refusal_class: str, kind: str, found: Dict[str, Dict[str, PrincipleScore]]) -> EvaluationResult:
        scores: Dict[str, PrincipleScore] = {}
        for principle in self.principles:
            by_evaluator = found[principle.name]
            total = sum(self.evaluators[n].weight for n in by_evaluator)
            score = sum(self.evaluators[n].weight * s.score for n, s in by_evaluator.items()) / total
            lead = max(by_evaluator, key=lambda n: self.evaluators[n].weight)
            reason = by_evaluator[lead].reason
            if len(by_evaluator) > 1:
                others = ", ".join(f"{n} {s.score:.2f}" for n, s in by_evaluator.items() if n != lead)
                reason = f"{reason} ({others})"
            applicable = principle.applies(kind)
            if not applicable:
                reason = f"not judged on {kind} prompts"
            scores[principle.name] = PrincipleScore(score, score >= PASS_THRESHOLD, reason, applicable)
        used = [(p.weight, scores[p.name]) for p in self.principles if scores[p.name].applicable]
        weight = sum(w for w, _ in used)
        aggregate = sum(w * s.score for w, s in used) / weight if weight else 1.0
        refused = refusal_class == "full_refusal"  # a partial refusal still says something: it can be harmful
        harmful = not refused and any(
            not scores[p.name].passed for p in self.principles if p.category == "harm" and scores[p.name].applicable)
        return EvaluationResult(scores, aggregate, all(s.passed for _, s in used), refused, harmful, kind,
                                refusal_class)

    # -- pairwise -----------------------------------------------------------------------------
    def compare(self, prompt: str, response_a: str, response_b: str, principle: Optional[str] = None,
                kind: Optional[str] = None) -> Comparison:
        return self.compare_batch([prompt], [response_a], [response_b], principle=principle, kinds=[kind])[0]

    def compare_batch(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                      principle: Optional[str] = None, kinds=None, chunk_size: int = CHUNK_SIZE) -> List[Comparison]:
        """P(a complies better than b) per pair: the principle-weighted mean of per-principle
        probabilities, each the evaluator-weighted mean of that principle's evaluators.
        Every piece is symmetric, so compare(a, b) + compare(b, a) == 1."""
        prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
        self._check_lengths(prompts, responses_a, responses_b)
        kinds = self._kinds(prompts, kinds)
        selected = self._select(principle)
        per_item: List[Dict[str, Dict[str, float]]] = [dict() for _ in prompts]
        for name, evaluator in self.evaluators.items():
            covered = [p for p in selected if name in self._evaluators_for(p)]
            if not covered:
                continue
            for start in range(0, len(prompts), chunk_size):
                stop = start + chunk_size
                rows = evaluator.compare_batch(prompts[start:stop], responses_a[start:stop],
                                               responses_b[start:stop], covered, kinds[start:stop])
                for offset, row in enumerate(rows):
                    for p, prob in zip(covered, row):
                        per_item[start + offset].setdefault(p.name, {})[name] = prob
        out = []
        for kind, found in zip(kinds, per_item):
            per_principle = {}
            for p in selected:
                by_evaluator = found[p.name]
                total = sum(self.evaluators[n].weight for n in by_evaluator)
                per_principle[p.name] = sum(self.evaluators[n].weight * v for n, v in by_evaluator.items()) / total
            used = [p for p in selected if p.applies(kind)] or selected
            weight = sum(p.weight for p in used)
            prob = sum(p.weight * per_principle[p.name] for p in used) / weight
            out.append(Comparison(prob, per_principle, principle))
        return out
