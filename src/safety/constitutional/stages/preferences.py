"""Preference pairs from AI feedback (the RL-CAI labelling step).

For every prompt the SFT model samples `samples_per_prompt` answers (ONE batched `generate` call over
the repeated prompts); every two distinct answers to the same prompt form a pair, and the
constitutional framework's judge says which complies better (`framework.compare_batch`, which
scores both presentation orders to cancel position bias). On top of that, which sample is shown
as "a" is drawn at random per pair, so the judge's slot never lines up with sample order.

The written pair's `chosen` is the answer the judge preferred and `label` = P(chosen better) in
[0.5, 1] (a soft label; the Bradley-Terry loss uses it directly). Near-ties carry no signal:
|p - 0.5| < tie_margin pairs are dropped, or kept with their soft label when `keep_ties`.
"""
from __future__ import annotations

import gzip
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..common.io import atomic_path, atomic_write_jsonl
from ..common.pairs import PreferencePair, pair_to_record
from ..training.generation import GenerationConfig, Prompt, generate, to_messages

log = logging.getLogger(__name__)


def _default_generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=64, temperature=1.0, top_p=0.95)


@dataclass
class PreferenceConfig:
    samples_per_prompt: int = 2        # answers sampled per prompt; every two distinct ones make a pair
    tie_margin: float = 0.05           # |P(a better) - 0.5| below this is a tie
    keep_ties: bool = False            # False: drop ties; True: keep them with their soft label
    # Clamp the soft label into [low, high], e.g. [0.4, 0.6]: Bai et al. (2022) clamp chain-of-thought
    # labels so that an over-confident judge cannot push the reward model to extreme margins.
    label_clamp: Optional[List[float]] = None
    generation: GenerationConfig = field(default_factory=_default_generation)
    seed: int = 0

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ValueError(f"PreferenceConfig.samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        if not 0 <= self.tie_margin < 0.5:
            raise ValueError(f"PreferenceConfig.tie_margin must be in [0, 0.5), got {self.tie_margin}")
        if self.label_clamp is not None:
            low, high = list(self.label_clamp) if len(self.label_clamp) == 2 else (None, None)
            if low is None or not 0.0 <= low < 0.5 < high <= 1.0:
                raise ValueError(f"PreferenceConfig.label_clamp must be [low, high] with 0 <= low < 0.5 < high <= 1, "
                                 f"got {self.label_clamp}")
        if isinstance(self.generation, dict):  # from YAML
            self.generation = GenerationConfig(**self.generation)


def _judge_prompt(prompt: Prompt) -> str:
    """The text the judge sees: the prompt itself, or the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(list(prompt)) if m["role"] == "user")


def _deciding_principle(comparison):
    """The principle the label rests on: the one compared on, else the most decisive one."""
    if getattr(comparison, "principle", None):
        return comparison.principle
    per = getattr(comparison, "per_principle", None) or {}
    if not per:
        return None
    return max(per, key=lambda name: abs(per[name] - 0.5))


def _sample_answers(model, tokenizer, prompts: Sequence[Prompt], k: int, generation: GenerationConfig, seed: int,
                    show_progress: bool, desc: str) -> List[str]:
    """k sampled answers per prompt, prompt-major (answers i*k .. i*k+k-1 are prompt i's); the torch
    generator seeded so that the same seed draws the same answers."""
    torch.manual_seed(seed)
    return generate(model, tokenizer, [p for p in prompts for _ in range(k)], generation, show_progress=show_progress,
                    desc=desc).texts


def generate_preference_pairs(model, tokenizer, prompts: Sequence[Prompt], framework, config: PreferenceConfig = None,
                              show_progress: bool = True) -> Tuple[List[PreferencePair], dict]:
    """Sample answers, let the constitution judge each pair, return (pairs, stats)."""
    config = config or PreferenceConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: give at least one prompt to sample preference pairs for")
    k = config.samples_per_prompt
    rng = random.Random(config.seed)
    texts = _sample_answers(model, tokenizer, prompts, k, config.generation, config.seed, show_progress,
                            desc="sampling answers for preferences")

    candidates, identical = [], 0  # (prompt index, answer a, answer b)
    for i in range(len(prompts)):
        answers = texts[i * k:(i + 1) * k]
        for x, y in combinations(range(k), 2):
            a, b = answers[x], answers[y]
            if not a.strip() or not b.strip() or a.strip() == b.strip():
                identical += 1  # nothing to prefer
                continue
            if rng.random() < 0.5:
                a, b = b, a
            candidates.append((i, a, b))

    comparisons = []
    if candidates:
        comparisons = framework.compare_batch([_judge_prompt(prompts[i]) for i, _, _ in candidates],
                                              [a for _, a, _ in candidates], [b for _, _, b in candidates])
    pairs, ties, chosen_was_a, principles = [], 0, 0, Counter()
    system = config.generation.system_prompt
    for (i, a, b), comparison in zip(candidates, comparisons):
        p = float(comparison.prob_a_better)
        if not 0.0 <= p <= 1.0 or p != p:
            raise ValueError(f"the judge returned prob_a_better={p}, outside [0, 1]")
        if abs(p - 0.5) < config.tie_margin:
            ties += 1
            if not config.keep_ties:
                continue
        a_wins = p >= 0.5
        if config.label_clamp is not None:  # the winner stays; only the label's confidence is capped
            p = min(max(p, config.label_clamp[0]), config.label_clamp[1])
        chosen_was_a += int(a_wins)
        principle = _deciding_principle(comparison)
        principles[principle or "-"] += 1
        pairs.append(PreferencePair(prompt=to_messages(prompts[i], system), chosen=a if a_wins else b,
                                    rejected=b if a_wins else a, label=p if a_wins else 1.0 - p,
                                    principle=principle))
    rng.shuffle(pairs)
    stats = {
        "prompts": len(prompts), "samples": len(texts), "candidate_pairs": len(candidates),
        "identical_or_empty": identical, "ties": ties, "ties_dropped": 0 if config.keep_ties else ties,
        "pairs": len(pairs),
        "mean_label": sum(p.label for p in pairs) / len(pairs) if pairs else None,
        "chosen_was_first_shown": chosen_was_a / len(pairs) if pairs else None,
        "principles": dict(principles),
    }
    log.info("preference pairs: %d kept of %d candidates (%d ties, %d identical/empty)",
             len(pairs), len(candidates), ties, identical)
    return pairs, stats


def write_pairs(pairs: Sequence[PreferencePair], path) -> Path:
    """JSONL (gzip when the name ends in .gz), written atomically; reads back with `hh_rlhf.load_pairs`."""
    path = Path(path)
    records = [pair_to_record(p) for p in pairs]
    if path.suffix != ".gz":
        return atomic_write_jsonl(path, records)
    import json
    with atomic_path(path) as tmp:
        with gzip.open(tmp, "wt", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def stage1_pairs(chains: Sequence[dict], sft_records: Sequence[dict], refusals: Sequence[str],
                 seed: int = 0) -> Tuple[List[PreferencePair], dict]:
    """Preference pairs stage 1 already decided, for the reward model (`data.stage1_pairs`):

    - each red-team answer the constitution had revised: final answer (a revision, or a written safe
      response) preferred to the model's first answer, as the CAI paper's critique-revision chains do;
    - each benign prompt of the helpful mix-in: the model's own answer preferred to a written refusal
      (`refusals`, the constitution's safe responses), so that the reward model learns that refusing
      a harmless request is worse than answering it, not that refusing is good in itself.

    Without the second kind, a reward model trained on revisions learns "refusals score high" and RL
    against it over-refuses; without the first, the human and AI pairs alone scored the written
    refusals below the base model's answers (docs/safety_effect.md, run F)."""
    rng = random.Random(seed)
    pairs = []
    for chain in chains:
        first, final = str(chain.get("initial_response", "")).strip(), str(chain.get("final_response", "")).strip()
        if first and final and first != final:
            pairs.append(PreferencePair(to_messages(chain["prompt"]), final, first, principle="stage1_revision"))
    n_revision = len(pairs)
    if refusals:
        for record in sft_records:
            if record.get("source") == "helpful" and str(record.get("response", "")).strip():
                pairs.append(PreferencePair(to_messages(record["prompt"]), record["response"].strip(),
                                            rng.choice(list(refusals)), principle="stage1_helpful"))
    return pairs, {"revision_pairs": n_revision, "helpful_pairs": len(pairs) - n_revision}


def judged_pairs(model, tokenizer, prompts: Sequence[str], judge, generation: GenerationConfig,
                 samples_per_prompt: int = 4, refusals: Sequence[str] = (), seed: int = 0,
                 show_progress: bool = True) -> Tuple[List[PreferencePair], dict]:
    """On-policy pairs ranked by the rule-based judge (`rl.dpo_pairs=judged`): the model samples
    `samples_per_prompt` answers per prompt, `judge` (a `judge_reward.RuleBasedReward`, which knows
    each prompt's kind) scores every answer, and the best-scored answer is preferred to the
    worst-scored one wherever their scores differ. A prompt the model already handles the same way
    every time gives no pair, so the pairs sit exactly where the policy still errs, on both kinds of
    prompt alike: refusing a benign request is rejected as often as complying with a harmful one.
    Where every sample of a harmful prompt is scored below a refusal's +1, one of `refusals` (the
    constitution's written safe responses) is preferred to the worst sample, as stage 1's fallback does.

    Why not stage 1's decisions (`rl.dpo_pairs=stage1`)? Their rejected red-team answers are the base
    model's, which the SFT model already finds unlikely, while their rejected benign answers are
    written refusals the SFT model finds very likely: DPO then mostly lowers refusals everywhere
    (docs/safety_effect.md, run J). Returns (pairs, stats)."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts: give at least one prompt to sample judged pairs for")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2, got {samples_per_prompt}")
    rng = random.Random(seed)
    k = samples_per_prompt
    repeated = [p for p in prompts for _ in range(k)]
    texts = [t.strip() for t in _sample_answers(model, tokenizer, prompts, k, generation, seed, show_progress,
                                                desc="sampling answers for judged pairs")]
    scores = judge(repeated, texts).tolist()
    details = list(judge.last_details)
    pairs, counts = [], Counter()
    for i, prompt in enumerate(prompts):
        kind = details[i * k][0]
        ranked = sorted(((scores[i * k + j], texts[i * k + j]) for j in range(k) if texts[i * k + j]),
                        key=lambda st: st[0])
        counts[f"{kind}_prompts"] += 1
        if not ranked:
            continue
        (low, worst), (high, best) = ranked[0], ranked[-1]
        if high > low:
            pairs.append(PreferencePair(to_messages(prompt, generation.system_prompt), best, worst,
                                        principle=f"judged_{kind}"))
            counts[f"{kind}_pairs"] += 1
        elif kind == "harmful" and high < 1.0 and refusals:  # every sample short of refusing
            pairs.append(PreferencePair(to_messages(prompt, generation.system_prompt), rng.choice(list(refusals)),
                                        worst, principle="judged_harmful_written"))
            counts["harmful_written_pairs"] += 1
        else:
            counts[f"{kind}_{'all_right' if high >= (1.0 if kind == 'harmful' else 0.0) else 'all_wrong'}"] += 1
    rng.shuffle(pairs)
    stats = {"prompts": len(prompts), "samples": len(texts), "pairs": len(pairs), **dict(sorted(counts.items())),
             "mean_score": sum(scores) / len(scores)}
    log.info("judged pairs: %s", stats)
    return pairs, stats


def balance_judged_pairs(pairs: Sequence[PreferencePair], benign_ratio: float, seed: int = 0) -> List[PreferencePair]:
    """Repeat one kind's pairs (`judged_pairs`' principle says which) until benign pairs number
    `benign_ratio` x harmful ones. DPO's pairs on the two kinds pull the same refusal texts in opposite
    directions; with more harmful pairs than benign ones (92 to 55 on the default model) the net pull
    is toward refusing everywhere (docs/safety_effect.md, run K0), so the default weighs them evenly."""
    if not benign_ratio > 0:
        raise ValueError(f"benign_ratio must be > 0, got {benign_ratio!r}")
    harmful = [p for p in pairs if str(p.principle).startswith("judged_harmful")]
    benign = [p for p in pairs if p.principle == "judged_benign"]
    if not harmful or not benign:
        return list(pairs)
    rng = random.Random(seed)

    def repeats(kind: List[PreferencePair], total: int) -> List[PreferencePair]:
        """The copies that bring `kind` up to `total` pairs: whole copies first, then a random remainder."""
        more, rest = divmod(total - len(kind), len(kind))
        return kind * more + rng.sample(kind, rest)

    target = round(benign_ratio * len(harmful))
    extra = (repeats(benign, target) if target >= len(benign)
             else repeats(harmful, round(len(benign) / benign_ratio)))
    out = list(pairs) + extra
    rng.shuffle(out)
    return out
