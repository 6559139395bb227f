"""The constitution as data: principles read from a YAML file a user can edit or replace.

Each principle carries what the Constitutional AI paper (Bai et al. 2022) gives it, a critique
request and a revision request, plus what this toolkit needs to *judge* it: a weight in the
aggregate, a category, which prompts it is judged on, which evaluators judge it, an optional
question for the model judge and optional regexes for the rule evaluator.

    principles:
      - name: harm_weapons
        category: harm                 # harm | honesty | privacy | fairness | helpfulness
        weight: 1.0
        applies_to: all                # all | harmful | benign
        evaluators: [rules, classifier, judge]
        description: ...
        critique_request: ...
        revision_request: ...
        judge_question: ...            # optional; a yes/no question, "yes" = the answer complies
        patterns: [...]                # optional; regexes naming the topic (rule evaluator)
    few_shot:
      - {prompt: ..., response: ..., principle: harm_weapons, critique: ..., revision: ...}
    judge:                             # optional: the chat-model judge's prompts and answer words
      score_template: ...              #   placeholders {conversation} {response} {question}
      compare_template: ...            #   placeholders {conversation} {first} {second} {description}
      yes_words: [Yes], no_words: [No], a_words: [A], b_words: [B], weight: 1.0
    guard:                             # optional: which labels of a guard classifier mean safe/unsafe
      safe_labels: [safe]              #   names from the model's config.id2label
      unsafe_labels: [unsafe]          #   either list, or both (then renormalised over the two)
      weight: 2.0

A malformed file raises `ConstitutionError` naming the file, the principle and the field.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import yaml

from ..common.io import REPO_ROOT

DEFAULT_CONSTITUTION_PATH = REPO_ROOT / "data" / "constitution.yaml"

CATEGORIES = ("harm", "honesty", "privacy", "fairness", "helpfulness")
APPLIES_TO = ("all", "harmful", "benign")
EVALUATORS = ("rules", "judge", "classifier", "harm_judge", "reward_model", "guard")
_REQUIRED_TEXT = ("name", "description", "critique_request", "revision_request")
_FEW_SHOT_FIELDS = ("prompt", "response", "principle", "critique", "revision")
# The placeholders each judge template must contain (and the only ones it may contain).
JUDGE_TEMPLATE_FIELDS = {"score_template": ("conversation", "response", "question"),
                         "compare_template": ("conversation", "first", "second", "description")}
_JUDGE_WORD_FIELDS = ("yes_words", "no_words", "a_words", "b_words")
_GUARD_LABEL_FIELDS = ("safe_labels", "unsafe_labels")


class ConstitutionError(ValueError):
    """A constitution file that cannot be used; the message names file, principle and field."""

    def __init__(self, source, message: str, principle: Optional[str] = None, field: Optional[str] = None):
        self.source, self.principle, self.field = source, principle, field
        where = [str(source or "<constitution>")]
        if principle is not None:
            where.append(f"principle {principle!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where) + f": {message}")


@dataclass
class Principle:
    name: str
    description: str
    critique_request: str
    revision_request: str
    weight: float = 1.0
    category: str = "harm"
    applies_to: str = "all"
    evaluators: List[str] = field(default_factory=lambda: ["rules"])
    judge_question: Optional[str] = None
    patterns: List[str] = field(default_factory=list)
    # Written safe answers (a refusal with a safe alternative) that stage 1 falls back to when the
    # model's own revisions still comply with a harmful request (critique.fallback_to_safe_responses).
    safe_responses: List[str] = field(default_factory=list)

    @property
    def question(self) -> str:
        """The yes/no question the model judge is asked; "Yes" means the answer complies."""
        return self.judge_question or f"Does the assistant's answer follow this principle: {self.description}"

    def applies(self, kind: Optional[str]) -> bool:
        """Whether the principle is judged on a prompt of this kind ("harmful"/"benign"/None = unknown)."""
        return self.applies_to == "all" or kind is None or self.applies_to == kind

    @property
    def compiled_patterns(self) -> List[re.Pattern]:
        cached = self.__dict__.get("_compiled")
        if cached is None:
            cached = [re.compile(p, re.IGNORECASE) for p in self.patterns]
            self.__dict__["_compiled"] = cached
        return cached


def template_problem(template, name: str) -> Optional[str]:
    """Why a judge template (`name` = score_template | compare_template) cannot be used, or None."""
    required = JUDGE_TEMPLATE_FIELDS[name]
    if not isinstance(template, str) or not template.strip():
        return f"must be a non-empty string, got {template!r}"
    try:
        found = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        return f"is not a valid format string ({err}); write literal braces as {{{{ and }}}}"
    missing = [f"{{{f}}}" for f in required if f not in found]
    unknown = sorted(f"{{{f}}}" for f in found - set(required))
    if missing:
        return f"is missing placeholder(s) {', '.join(missing)} (it needs {', '.join('{' + f + '}' for f in required)})"
    if unknown:
        return (f"has unknown placeholder(s) {', '.join(unknown)} (allowed: "
                f"{', '.join('{' + f + '}' for f in required)}; write literal braces as {{{{ and }}}})")
    return None


def _word_list(value, source, block: str, key: str) -> List[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConstitutionError(source, f"must be a non-empty list of strings, got {value!r}", field=f"{block}.{key}")
    return [v if key in _JUDGE_WORD_FIELDS else v.strip() for v in value]


def _weight(value, source, block: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConstitutionError(source, f"must be a positive number, got {value!r}", field=f"{block}.weight")
    return float(value)


def _parse_judge(raw, source) -> dict:
    """The `judge:` block as JudgeEvaluator keyword arguments."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConstitutionError(source, f"must be a mapping, got {type(raw).__name__}", field="judge")
    allowed = (*JUDGE_TEMPLATE_FIELDS, *_JUDGE_WORD_FIELDS, "weight")
    out = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConstitutionError(source, f"unknown field (allowed: {', '.join(allowed)})", field=f"judge.{key}")
        if key in JUDGE_TEMPLATE_FIELDS:
            problem = template_problem(value, key)
            if problem:
                raise ConstitutionError(source, problem, field=f"judge.{key}")
            out[key] = value.strip()
        elif key == "weight":
            out[key] = _weight(value, source, "judge")
        else:
            out[key] = _word_list(value, source, "judge", key)
    return out


def _parse_guard(raw, source) -> dict:
    """The `guard:` block as SequenceClassifierEvaluator keyword arguments."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConstitutionError(source, f"must be a mapping, got {type(raw).__name__}", field="guard")
    allowed = (*_GUARD_LABEL_FIELDS, "weight")
    out = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConstitutionError(source, f"unknown field (allowed: {', '.join(allowed)})", field=f"guard.{key}")
        out[key] = _weight(value, source, "guard") if key == "weight" else _word_list(value, source, "guard", key)
    if not any(key in out for key in _GUARD_LABEL_FIELDS):
        raise ConstitutionError(source, "give safe_labels or unsafe_labels (label names from the model's "
                                "config.id2label)", field="guard.safe_labels")
    both = set(out.get("safe_labels", [])) & set(out.get("unsafe_labels", []))
    if both:
        raise ConstitutionError(source, f"label(s) {sorted(both)} are listed as both safe and unsafe",
                                field="guard.unsafe_labels")
    return out


@dataclass
class Constitution:
    principles: List[Principle]
    few_shot: List[dict] = field(default_factory=list)
    source: Optional[str] = None
    judge: dict = field(default_factory=dict)   # JudgeEvaluator options from the `judge:` block
    guard: dict = field(default_factory=dict)   # SequenceClassifierEvaluator options from `guard:`

    def get(self, name: str) -> Principle:
        for principle in self.principles:
            if principle.name == name:
                return principle
        raise KeyError(f"no principle named {name!r} in {self.source or 'the constitution'}; "
                       f"known: {', '.join(self.names)}")

    @property
    def names(self) -> List[str]:
        return [p.name for p in self.principles]

    @property
    def safe_responses(self) -> List[str]:
        """Every principle's written safe responses, in principle order (stage 1's fallback texts; the
        written refusals of stage-1 and judged preference pairs)."""
        return [text for p in self.principles for text in p.safe_responses]

    def sample(self, rng: random.Random, kind: Optional[str] = None) -> Principle:
        """One principle, drawn with probability proportional to its weight (as the CAI paper draws
        a principle per critique). With `kind`, only principles that apply to that prompt kind."""
        pool = [p for p in self.principles if p.applies(kind)] or self.principles
        return rng.choices(pool, weights=[p.weight for p in pool], k=1)[0]

    def few_shot_for(self, name: Optional[str] = None) -> List[dict]:
        """Few-shot critique/revision examples, those for principle `name` first."""
        if name is None:
            return list(self.few_shot)
        return sorted(self.few_shot, key=lambda ex: ex["principle"] != name)


def _parse_principle(raw, index: int, source) -> Principle:
    label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else f"#{index + 1}"
    if not isinstance(raw, dict):
        raise ConstitutionError(source, f"each principle must be a mapping, got {type(raw).__name__}", label)
    known = set(Principle.__dataclass_fields__)
    for key in raw:
        if key not in known:
            raise ConstitutionError(source, f"unknown field (allowed: {', '.join(sorted(known))})", label, str(key))
    for key in _REQUIRED_TEXT:
        value = raw.get(key)
        if value is None:
            raise ConstitutionError(source, "missing (required)", label, key)
        if not isinstance(value, str) or not value.strip():
            raise ConstitutionError(source, f"must be a non-empty string, got {value!r}", label, key)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", raw["name"]):
        raise ConstitutionError(source, "use letters, digits, '_' or '-' only", label, "name")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ConstitutionError(source, f"must be a positive number, got {weight!r}", label, "weight")
    category = raw.get("category", "harm")
    if category not in CATEGORIES:
        raise ConstitutionError(source, f"must be one of {', '.join(CATEGORIES)}, got {category!r}", label, "category")
    applies_to = raw.get("applies_to", "all")
    if applies_to not in APPLIES_TO:
        raise ConstitutionError(source, f"must be one of {', '.join(APPLIES_TO)}, got {applies_to!r}",
                                label, "applies_to")
    evaluators = raw.get("evaluators", ["rules"])
    if isinstance(evaluators, str):
        evaluators = [evaluators]
    if not isinstance(evaluators, list) or not evaluators:
        raise ConstitutionError(source, f"must be a non-empty list of {', '.join(EVALUATORS)}", label, "evaluators")
    for name in evaluators:
        if name not in EVALUATORS:
            raise ConstitutionError(source, f"unknown evaluator {name!r} (choose from {', '.join(EVALUATORS)})",
                                    label, "evaluators")
    question = raw.get("judge_question")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise ConstitutionError(source, f"must be a non-empty string, got {question!r}", label, "judge_question")
    patterns = raw.get("patterns", []) or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConstitutionError(source, "must be a list of regular expressions (strings)", label, "patterns")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConstitutionError(source, f"bad regular expression {pattern!r}: {err}", label, "patterns") from err
    safe = raw.get("safe_responses", []) or []
    if isinstance(safe, str):
        safe = [safe]
    if not isinstance(safe, list) or not all(isinstance(t, str) and t.strip() for t in safe):
        raise ConstitutionError(source, "must be a list of non-empty strings", label, "safe_responses")
    return Principle(name=raw["name"], description=raw["description"].strip(),
                     critique_request=raw["critique_request"].strip(),
                     revision_request=raw["revision_request"].strip(), weight=float(weight), category=category,
                     applies_to=applies_to, evaluators=list(evaluators),
                     judge_question=question.strip() if question else None, patterns=list(patterns),
                     safe_responses=[" ".join(t.split()) for t in safe])


def parse_constitution(data, source=None) -> Constitution:
    """Build a Constitution from already-parsed YAML/JSON data (a mapping)."""
    if not isinstance(data, dict):
        raise ConstitutionError(source, "the top level must be a mapping with a 'principles' list")
    unknown = set(data) - {"principles", "few_shot", "version", "name", "description", "judge", "guard"}
    if unknown:
        raise ConstitutionError(source, f"unknown top-level key(s) {sorted(unknown)}", field=sorted(unknown)[0])
    raw_principles = data.get("principles")
    if not isinstance(raw_principles, list) or not raw_principles:
        raise ConstitutionError(source, "must be a non-empty list of principles", field="principles")
    principles = [_parse_principle(raw, i, source) for i, raw in enumerate(raw_principles)]
    seen = set()
    for principle in principles:
        if principle.name in seen:
            raise ConstitutionError(source, "duplicate principle name", principle.name, "name")
        seen.add(principle.name)
    few_shot = data.get("few_shot") or []
    if not isinstance(few_shot, list):
        raise ConstitutionError(source, "must be a list of examples", field="few_shot")
    for i, example in enumerate(few_shot):
        label = f"few_shot #{i + 1}"
        if not isinstance(example, dict):
            raise ConstitutionError(source, "each example must be a mapping", label)
        for key in _FEW_SHOT_FIELDS:
            if not isinstance(example.get(key), str) or not example[key].strip():
                raise ConstitutionError(source, "missing or empty (required string)", label, key)
        if example["principle"] not in seen:
            raise ConstitutionError(source, f"names unknown principle {example['principle']!r}", label, "principle")
    return Constitution(principles, [dict(ex) for ex in few_shot], str(source) if source else None,
                        judge=_parse_judge(data.get("judge"), source), guard=_parse_guard(data.get("guard"), source))


def load_constitution(path: Union[str, Path, None] = None) -> Constitution:
    """Read a constitution YAML (None -> data/constitution.yaml)."""
    path = Path(path) if path is not None else DEFAULT_CONSTITUTION_PATH
    if not path.is_file():
        raise ConstitutionError(path, "file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConstitutionError(path, f"not valid YAML: {err}") from err
    return parse_constitution(data, path)
