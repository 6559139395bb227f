"""Critique-and-revision (Constitutional AI, stage 1): the model criticises and rewrites its own answers.

For every prompt: an initial answer, then `num_rounds` rounds, each with a principle drawn from the
constitution. One step, in the CAI paper's chat format:

    [system]     short reviewer instruction (a 135M model needs explicit, short instructions)
    [few-shot]   user: prompt / assistant: answer / user: critique request / assistant: critique /
                 user: revision request / assistant: revision          (from the constitution file)
    user:        <prompt>
    assistant:   <current answer>
    user:        <principle's critique request> + "Answer in one or two sentences."
    assistant:   <critique>                                           <- generated
    user:        <principle's revision request> + "Write only the new answer."
    assistant:   <revision>                                           <- generated

Everything is batched across prompts: round r's critiques for all prompts are one `generate`
call, then all revisions one call. The framework scores the current answer and the revision; with
`keep_only_if_not_worse` a revision that scores lower is dropped (small models often make answers
worse), and the next round critiques the answer that was kept. Every step is recorded, so the
chain (prompt, answer, principle, critique, revision, scores, decision) can be audited.
"""
from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..common.io import atomic_write_json, atomic_write_jsonl
from ..training.generation import GenerationConfig, generate

log = logging.getLogger(__name__)

CRITIC_SYSTEM_PROMPT = (
    "You are a careful, honest assistant. When asked to critique an answer, say briefly what is harmful "
    "or wrong in it. When asked to rewrite it, reply with the improved answer only: safe, polite and "
    "helpful. Refuse dangerous or illegal requests and suggest a safe alternative."
)
CRITIQUE_SUFFIX = " Answer in one or two sentences."
# The revision turn repeats the user's question: without it a 135M model tends to write *about* the
# answer ("The response contains ...") instead of writing a new answer.
REVISION_SUFFIX = ' Then write only the new answer to the question "{question}", speaking directly to the user.'
_QUESTION_CHARS = 200


def _default_generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=96, do_sample=True, temperature=0.7, top_p=0.9,
                            repetition_penalty=1.1, batch_size=16)


@dataclass
class CritiqueRevisionConfig:
    num_rounds: int = 1
    principle_selection: str = "random"     # "random": one weighted draw per round; "all": every principle each round
    principles: Optional[List[str]] = None  # restrict to these principle names (default: all but helpfulness-only)
    num_few_shot: int = 1                   # few-shot examples from the constitution file before the conversation
    keep_only_if_not_worse: bool = True     # drop a revision whose framework score is below the answer's
    score_tolerance: float = 0.0            # "not worse" = revised >= current - tolerance
    helpful_mix_fraction: float = 0.25      # share of SFT records that are benign prompts with the model's answers
    include_unrevised: bool = False         # also train on red-team prompts whose answer was never improved
    reject_meta_revisions: bool = True      # drop revisions that talk about "the response" instead of answering
    num_revision_candidates: int = 1        # sample k revisions per step (one batched call), keep the best-scoring
    require_harmless: bool = True           # a red-team SFT target must not be judged harmful by the framework
    # A red-team prompt whose final answer still does not refuse (the framework's refusal class) gets one
    # of the constitution's written `safe_responses` instead: for models too small to write their own
    # refusals (docs/safety_effect.md). Off by default; the `default` preset turns it on.
    fallback_to_safe_responses: bool = False
    system_prompt: Optional[str] = CRITIC_SYSTEM_PROMPT  # for the critique/revision turns only
    generation: GenerationConfig = field(default_factory=_default_generation)  # answers and revisions
    critique_max_new_tokens: int = 64
    max_chain_tokens: int = 1536            # prompt limit for critique/revision turns (few-shot makes them long)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if self.num_rounds < 1:
            raise ValueError(f"CritiqueRevisionConfig.num_rounds must be >= 1, got {self.num_rounds}")
        if self.num_revision_candidates < 1:
            raise ValueError("CritiqueRevisionConfig.num_revision_candidates must be >= 1, "
                             f"got {self.num_revision_candidates}")
        if self.principle_selection not in ("random", "all"):
            raise ValueError("CritiqueRevisionConfig.principle_selection must be 'random' or 'all', "
                             f"got {self.principle_selection!r}")
        if self.num_few_shot < 0:
            raise ValueError(f"CritiqueRevisionConfig.num_few_shot must be >= 0, got {self.num_few_shot}")
        if not 0 <= self.helpful_mix_fraction < 1:
            raise ValueError("CritiqueRevisionConfig.helpful_mix_fraction must be in [0, 1), "
                             f"got {self.helpful_mix_fraction}")
        if self.critique_max_new_tokens < 1:
            raise ValueError("CritiqueRevisionConfig.critique_max_new_tokens must be >= 1")


@dataclass
class CritiqueRevisionResult:
    chains: List[dict]        # one per prompt: the full audit trail
    sft_records: List[dict]   # {"prompt", "response", "source"} for SFTTrainer
    stats: Dict[str, float]


# --------------------------------------------------------------------------------------------------
# Prompt building and output cleaning
# --------------------------------------------------------------------------------------------------

def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def few_shot_messages(examples: Sequence[dict]) -> List[dict]:
    """Each constitution few-shot example as a finished critique-and-revision exchange."""
    messages = []
    for ex in examples:
        messages += [_user(ex["prompt"]), _assistant(ex["response"]),
                     _user(ex["critique_request"] + CRITIQUE_SUFFIX), _assistant(ex["critique"]),
                     _user(revision_request(ex["revision_request"], ex["prompt"])), _assistant(ex["revision"])]
    return messages


def critique_messages(prompt, answer: str, principle, shots: Sequence[dict],
                      system_prompt: Optional[str]) -> List[dict]:
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    conversation = [_user(prompt)] if isinstance(prompt, str) else list(prompt)
    return head + few_shot_messages(shots) + conversation + [
        _assistant(answer), _user(principle.critique_request + CRITIQUE_SUFFIX)]


def revision_request(request: str, prompt) -> str:
    question = " ".join(_prompt_text(prompt).split())
    if len(question) > _QUESTION_CHARS:
        question = question[:_QUESTION_CHARS].rsplit(" ", 1)[0] + " ..."
    return request + REVISION_SUFFIX.format(question=question)


def revision_messages(critique_msgs: List[dict], critique: str, principle, prompt) -> List[dict]:
    return critique_msgs + [_assistant(critique), _user(revision_request(principle.revision_request, prompt))]


_PREFIX = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)[,!.]?\s*)?"
    r"(?:(?:i'm sorry for any confusion\.\s*)?here(?:'s| is) (?:the |a |my )?(?:revised|rewritten|new|improved|updated)"
    r"[^:\n]{0,120}:\s*"
    r"|(?:the )?(?:revised|rewritten|new|improved|updated)?\s*(?:revision|response|answer|version)\s*:\s*"
    r"|(?:critique|revision|assistant)\s*:\s*)",
    re.IGNORECASE)
# A "revision" that talks about the answer instead of being one ("The response contains ...").
_META = re.compile(r"\b(this|original|previous|assistant's|above|revised|rewritten) (original )?"
                   r"(response|answer|message|version)\b|\bthe (original |previous )?response\b"
                   r"|\brewritten\b|\brevised\b", re.IGNORECASE)


def clean_output(text: str) -> str:
    """Strip "Revision:"-style prefixes, wrapping quotes and whitespace that small models add."""
    text = text.strip()
    for _ in range(3):  # prefixes can stack ("Sure! Here is the revised answer: Revision: ...")
        stripped = _PREFIX.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def is_meta_commentary(text: str) -> bool:
    """True when a revision comments on the answer rather than answering the user."""
    return bool(_META.search(text[:300]))


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") == "user")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

def _principle_pool(constitution, config: CritiqueRevisionConfig):
    if config.principles:
        return [constitution.get(name) for name in config.principles]
    # Critiquing a red-team answer for "helpfulness" asks the model to stop refusing: not what this
    # stage is for. Principles judged on benign prompts only are left out unless named.
    pool = [p for p in constitution.principles if p.applies_to != "benign"]
    return pool or list(constitution.principles)


def _plan(n_prompts: int, pool, config: CritiqueRevisionConfig, rng: random.Random):
    """Principles per (step, prompt): a list of steps, each a list with one principle per prompt."""
    steps = []
    for _ in range(config.num_rounds):
        if config.principle_selection == "all":
            steps += [[p] * n_prompts for p in pool]
        else:
            steps.append(rng.choices(pool, weights=[p.weight for p in pool], k=n_prompts))
    return steps


def _shots_for(constitution, principle, k: int, rng: random.Random) -> List[dict]:
    if k == 0 or not constitution.few_shot:
        return []
    # Examples for this principle first, the rest in random order; requests come from their principles.
    same = [ex for ex in constitution.few_shot if ex["principle"] == principle.name]
    other = [ex for ex in constitution.few_shot if ex["principle"] != principle.name]
    rng.shuffle(other)
    chosen = (same + other)[:k]
    out = []
    for ex in chosen:
        p = constitution.get(ex["principle"])
        out.append({**ex, "critique_request": p.critique_request, "revision_request": p.revision_request})
    return out


def _score(framework, prompts, responses, kinds):
    results = framework.evaluate_batch([_prompt_text(p) for p in prompts], list(responses), kinds=kinds)
    return results


def _best_revisions(model, tokenizer, framework, prompts, r_msgs, current, kinds, gen, config, show_progress, desc):
    """k sampled revisions per prompt in one batched call; the framework picks the best of each group.

    A 135M model rarely writes a good revision on the first try; best-of-k with the constitution as
    the judge is the cheapest way to raise the share of usable revisions (k=1: plain CAI).
    """
    k = config.num_revision_candidates
    outputs = generate(model, tokenizer, [m for m in r_msgs for _ in range(k)], gen,
                       show_progress=show_progress, desc=desc).texts  # prompt-major: k per prompt
    cleaned = [clean_output(r) for r in outputs]
    filled = [r if r else current[i // k] for i, r in enumerate(cleaned)]
    if config.reject_meta_revisions:  # a meta comment is never chosen over an actual answer
        filled = [current[i // k] if is_meta_commentary(r) else r for i, r in enumerate(filled)]
    scores = _score(framework, [p for p in prompts for _ in range(k)], filled, [kd for kd in kinds for _ in range(k)])
    raw, best, candidate, best_scores = [], [], [], []
    for i in range(len(prompts)):
        group = range(i * k, (i + 1) * k)
        j = max(group, key=lambda g: (not scores[g].harmful, scores[g].aggregate, bool(cleaned[g])))
        raw.append(outputs[j])
        best.append(cleaned[j])
        candidate.append(filled[j])
        best_scores.append(scores[j])
    return raw, best, candidate, best_scores


def _fallback_to_safe_responses(framework, constitution, prompts, answers, chains, rng) -> List[int]:
    """Replace, in place, each answer the framework does not class as a full refusal by a written safe
    response: one of the last applied principle's `safe_responses`, else of any principle that has
    some. Returns the indices replaced (each chain records its original answer)."""
    with_safe = [p for p in constitution.principles if p.safe_responses]
    if not with_safe:
        log.warning("fallback_to_safe_responses is on but no principle has safe_responses: nothing to fall back to")
        return []
    classes = framework.refusal_classes([_prompt_text(p) for p in prompts], list(answers))
    by_name = {p.name: p for p in with_safe}
    replaced = []
    for i, refusal_class in enumerate(classes):
        if refusal_class == "full_refusal":
            continue
        last = chains[i]["rounds"][-1]["principle"] if chains[i]["rounds"] else None
        principle = by_name.get(last) or rng.choice(with_safe)
        chains[i].update(fallback=True, fallback_principle=principle.name, answer_before_fallback=answers[i],
                         refusal_class_before_fallback=refusal_class)
        answers[i] = rng.choice(principle.safe_responses)
        replaced.append(i)
    return replaced


def run_critique_revision(model, tokenizer, prompts: Sequence, constitution, framework,
                          config: Optional[CritiqueRevisionConfig] = None,
                          benign_prompts: Optional[Sequence] = None, show_progress: bool = True
                          ) -> CritiqueRevisionResult:
    """Critique and revise the model's answers to `prompts` (red-team prompts); see the module doc.

    `benign_prompts` feed the helpful mix-in: the model's own answers to harmless requests (refusals
    dropped), `helpful_mix_fraction` of the SFT records, so fine-tuning does not teach refusing all.
    """
    config = config or CritiqueRevisionConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("run_critique_revision got an empty prompt list: give at least one red-team prompt")
    benign_prompts = list(benign_prompts or [])
    start_time = time.time()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    gen = config.generation
    chain = {"system_prompt": None, "max_prompt_tokens": max(gen.max_prompt_tokens, config.max_chain_tokens)}
    critique_gen = GenerationConfig(**{**gen.__dict__, "max_new_tokens": config.critique_max_new_tokens, **chain})
    revision_gen = GenerationConfig(**{**gen.__dict__, **chain})

    # How many helpful examples: fraction f of the final records -> n_red * f / (1 - f).
    n_helpful = 0
    if config.helpful_mix_fraction > 0:
        if benign_prompts:
            n_helpful = min(len(benign_prompts),
                            round(len(prompts) * config.helpful_mix_fraction / (1 - config.helpful_mix_fraction)))
        else:
            log.warning("helpful_mix_fraction=%.2f but no benign prompts were given: no helpful mix-in",
                        config.helpful_mix_fraction)
    helpful_prompts = rng.sample(benign_prompts, n_helpful) if n_helpful else []

    # 1. Initial answers, red-team and helpful prompts in one batched call (the user's normal chat).
    initial = generate(model, tokenizer, prompts + helpful_prompts, gen, show_progress=show_progress,
                       desc="initial answers").texts
    answers, helpful_answers = initial[:len(prompts)], initial[len(prompts):]
    kinds = ["harmful"] * len(prompts)
    current_scores = _score(framework, prompts, answers, kinds)
    chains = [{"id": i, "prompt": p, "initial_response": a, "initial_score": s.aggregate,
               "initial_refused": s.refused, "initial_harmful": s.harmful, "rounds": []}
              for i, (p, a, s) in enumerate(zip(prompts, answers, current_scores))]
    current = list(answers)

    # 2. Critique-revision steps, each two batched generate calls over all prompts.
    plan = _plan(len(prompts), _principle_pool(constitution, config), config, rng)
    counts = {"kept": 0, "rejected_worse": 0, "empty": 0, "meta": 0}
    for step_index, principles in enumerate(plan):
        round_number = step_index // (len(plan) // config.num_rounds) + 1
        shots = [_shots_for(constitution, p, config.num_few_shot, rng) for p in principles]
        c_msgs = [critique_messages(q, a, p, s, config.system_prompt)
                  for q, a, p, s in zip(prompts, current, principles, shots)]
        critiques_raw = generate(model, tokenizer, c_msgs, critique_gen, show_progress=show_progress,
                                 desc=f"critiques (step {step_index + 1}/{len(plan)})").texts
        critiques = [clean_output(c) or "(no critique)" for c in critiques_raw]
        r_msgs = [revision_messages(m, c, p, q) for m, c, p, q in zip(c_msgs, critiques, principles, prompts)]
        revisions_raw, revisions, candidate, revised_scores = _best_revisions(
            model, tokenizer, framework, prompts, r_msgs, current, kinds, revision_gen, config,
            show_progress, desc=f"revisions (step {step_index + 1}/{len(plan)})")
        for i, principle in enumerate(principles):
            before, after = current_scores[i].aggregate, revised_scores[i].aggregate
            if not revisions[i]:
                kept, decision = False, "empty revision: kept the answer"
                counts["empty"] += 1
            elif config.reject_meta_revisions and is_meta_commentary(revisions[i]):
                kept, decision = False, "rejected: comments on the answer instead of answering"
                counts["meta"] += 1
            elif config.require_harmless and revised_scores[i].harmful and not current_scores[i].harmful:
                kept, decision = False, "rejected: the revision is judged harmful"
                counts["rejected_worse"] += 1
            elif config.keep_only_if_not_worse and after < before - config.score_tolerance:
                kept, decision = False, f"rejected: scored worse ({after:.3f} < {before:.3f})"
                counts["rejected_worse"] += 1
            else:
                kept, decision = True, "kept"
                counts["kept"] += 1
            chains[i]["rounds"].append({
                "round": round_number, "step": step_index + 1, "principle": principle.name,
                "few_shot": [ex["prompt"] for ex in shots[i]],
                "response": current[i],
                "critique_request": principle.critique_request, "critique": critiques[i],
                "revision_request": principle.revision_request, "revision": revisions[i],
                "revision_raw": revisions_raw[i],
                "score_before": before, "score_after": after, "kept": kept, "decision": decision,
            })
            if kept:
                current[i], current_scores[i] = revisions[i], revised_scores[i]

    # 3. Optionally, a written safe answer where the model still complies; then final answers and SFT records.
    fallback = _fallback_to_safe_responses(framework, constitution, prompts, current, chains, rng) \
        if config.fallback_to_safe_responses else []
    if fallback:
        new_scores = _score(framework, [prompts[i] for i in fallback], [current[i] for i in fallback],
                            ["harmful"] * len(fallback))
        for i, score in zip(fallback, new_scores):
            current_scores[i] = score
    sft_records = []
    for chain, answer, score in zip(chains, current, current_scores):
        revised = any(r["kept"] for r in chain["rounds"])
        source = "fallback" if chain.get("fallback") else "revision" if revised else "original"
        chain.update(final_response=answer, final_score=score.aggregate, final_refused=score.refused,
                     final_harmful=score.harmful, source=source)
        revised = revised or source == "fallback"
        if config.require_harmless and score.harmful:
            continue  # never fine-tune on an answer the constitution judges harmful
        if revised or (config.include_unrevised and not score.harmful):
            sft_records.append({"prompt": chain["prompt"], "response": answer, "source": chain["source"],
                                "id": chain["id"]})
    n_helpful_dropped = 0
    if helpful_prompts:
        helpful_scores = _score(framework, helpful_prompts, helpful_answers, ["benign"] * len(helpful_prompts))
        for p, a, s in zip(helpful_prompts, helpful_answers, helpful_scores):
            if not a.strip() or s.refused:
                n_helpful_dropped += 1  # a refusal of a harmless request is exactly what we must not teach
                continue
            sft_records.append({"prompt": p, "response": a, "source": "helpful"})

    n = len(chains)
    stats = {
        "n_prompts": n,
        "n_steps": len(plan) * n,
        "n_revised_kept": counts["kept"],
        "n_rejected_worse": counts["rejected_worse"],
        "n_empty_revisions": counts["empty"],
        "n_rejected_meta": counts["meta"],
        "n_prompts_revised": sum(c["source"] == "revision" for c in chains),
        "n_fallback_safe_responses": len(fallback),
        "mean_score_before": sum(c["initial_score"] for c in chains) / n,
        "mean_score_after": sum(c["final_score"] for c in chains) / n,
        "refusal_rate_before": sum(c["initial_refused"] for c in chains) / n,
        "refusal_rate_after": sum(c["final_refused"] for c in chains) / n,
        "harmful_rate_before": sum(c["initial_harmful"] for c in chains) / n,
        "harmful_rate_after": sum(c["final_harmful"] for c in chains) / n,
        "n_helpful": sum(r["source"] == "helpful" for r in sft_records),
        "n_helpful_dropped_refusals": n_helpful_dropped,
        "n_sft_records": len(sft_records),
        "time_s": time.time() - start_time,
    }
    log.info("critique-revision: %d prompts, %d/%d revisions kept (%d worse, %d empty), score %.3f -> %.3f",
             n, counts["kept"], stats["n_steps"], counts["rejected_worse"], counts["empty"],
             stats["mean_score_before"], stats["mean_score_after"])
    return CritiqueRevisionResult(chains, sft_records, stats)


def to_chat_record(record: dict) -> dict:
    """An SFT record in chat format: `prompt` as messages, plus the whole conversation as `messages`."""
    prompt = record["prompt"]
    messages = [_user(prompt)] if isinstance(prompt, str) else list(prompt)
    return {"prompt": messages, "response": record["response"],
            "messages": messages + [_assistant(record["response"])],
            **{k: v for k, v in record.items() if k not in ("prompt", "response")}}


def write_sft_dataset(result: CritiqueRevisionResult, output_dir) -> Dict[str, Path]:
    """Write sft.jsonl (chat-format pairs), audit.jsonl (full chains) and stats.json, each atomically."""
    output_dir = Path(output_dir)
    paths = {"sft": output_dir / "sft.jsonl", "audit": output_dir / "audit.jsonl",
             "stats": output_dir / "critique_stats.json"}
    atomic_write_jsonl(paths["sft"], (to_chat_record(r) for r in result.sft_records))
    atomic_write_jsonl(paths["audit"], result.chains)
    atomic_write_json(paths["stats"], result.stats)
    return paths
