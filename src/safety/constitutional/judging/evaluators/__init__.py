"""Pluggable per-principle evaluators: rules (regex), classifier (embeddings + logistic), judge (chat model)."""
from .base import PASS_THRESHOLD, Evaluator, PrincipleScore, make_score
from .rules import RuleEvaluator, gives_instructions, is_harmful_request, is_refusal

__all__ = ["PASS_THRESHOLD", "Evaluator", "PrincipleScore", "RuleEvaluator", "gives_instructions",
           "is_harmful_request", "is_refusal", "make_score"]
