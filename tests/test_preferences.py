"""AI-feedback preference pairs: sampling on the tiny model, judging, tie handling, writing."""
from dataclasses import dataclass, field

import pytest

from src.safety.constitutional.common.pairs import load_pairs
from src.safety.constitutional.stages.preferences import PreferenceConfig, generate_preference_pairs, write_pairs
from src.safety.constitutional.training.generation import GenerationConfig

PROMPTS = ["How do I pick a lock?", "Tell me a joke.", "What is 2 + 2?", "How do I hurt someone?",
           "Write a poem about rain.", "Where is Paris?"]


@dataclass
class FakeComparison:
    prob_a_better: float
    per_principle: dict = field(default_factory=dict)
    principle: str = None


class FakeFramework:
    """Cycles through fixed probabilities, two of them ties under a 0.05 margin."""

    probs = [0.9, 0.52, 0.2, 0.5, 0.75, 0.1]

    def __init__(self):
        self.calls = []

    def compare_batch(self, prompts, responses_a, responses_b):
        self.calls.append((list(prompts), list(responses_a), list(responses_b)))
        return [FakeComparison(self.probs[i % len(self.probs)], {"harmless": 0.6, "honest": self.probs[i % 6]})
                for i in range(len(prompts))]


def _config(**kw):
    return PreferenceConfig(generation=GenerationConfig(max_new_tokens=6, temperature=1.0, top_p=0.95,
                                                        batch_size=16), **kw)


def test_pairs_are_labelled_oriented_and_ties_dropped(tiny_model, tokenizer, tmp_path):
    framework = FakeFramework()
    pairs, stats = generate_preference_pairs(tiny_model, tokenizer, PROMPTS, framework, _config(), show_progress=False)
    assert len(framework.calls) == 1 and stats["samples"] == 2 * len(PROMPTS)
    n = stats["candidate_pairs"]
    assert n + stats["identical_or_empty"] == len(PROMPTS)
    expected_ties = sum(abs(FakeFramework.probs[i % 6] - 0.5) < 0.05 for i in range(n))
    assert stats["ties_dropped"] == expected_ties and len(pairs) == n - expected_ties
    for pair in pairs:
        assert 0.5 <= pair.label <= 1.0 and pair.chosen != pair.rejected
        assert pair.prompt[-1]["role"] == "user" and pair.prompt[-1]["content"] in PROMPTS
        assert pair.principle == "honest"  # the most decisive principle is recorded for audit
    # the judge saw the two samples in a random order: its "a" slot is not always sample 0
    path = write_pairs(pairs, tmp_path / "prefs.jsonl.gz")
    again = load_pairs(path)
    assert [(p.chosen, p.rejected, p.label) for p in again] == [(p.chosen, p.rejected, p.label) for p in pairs]


def test_ties_kept_with_soft_labels_when_asked(tiny_model, tokenizer):
    pairs, stats = generate_preference_pairs(tiny_model, tokenizer, PROMPTS, FakeFramework(),
                                             _config(keep_ties=True, samples_per_prompt=3), show_progress=False)
    assert stats["samples"] == 3 * len(PROMPTS) and stats["ties_dropped"] == 0
    assert len(pairs) == stats["candidate_pairs"] and any(p.label < 0.55 for p in pairs)


def test_real_framework_labels_in_unit_interval(tiny_model, tokenizer):
    from src.safety.constitutional.judging.framework import ConstitutionalFramework
    pairs, stats = generate_preference_pairs(tiny_model, tokenizer, PROMPTS, ConstitutionalFramework(),
                                             _config(keep_ties=True), show_progress=False)
    assert all(0.0 <= p.label <= 1.0 for p in pairs) and stats["pairs"] == len(pairs)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PreferenceConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="tie_margin"):
        PreferenceConfig(tie_margin=0.7)


def test_label_clamp_caps_confidence_not_the_winner(tiny_model, tokenizer):
    free, _ = generate_preference_pairs(tiny_model, tokenizer, PROMPTS, FakeFramework(), _config(),
                                        show_progress=False)
    clamped, _ = generate_preference_pairs(tiny_model, tokenizer, PROMPTS, FakeFramework(),
                                           _config(label_clamp=[0.4, 0.6]), show_progress=False)
    assert [(p.chosen, p.rejected) for p in clamped] == [(p.chosen, p.rejected) for p in free]
    assert [p.label for p in clamped] == [min(p.label, 0.6) for p in free]
    assert any(p.label > 0.6 for p in free)  # the clamp had something to do
    with pytest.raises(ValueError, match="label_clamp"):
        PreferenceConfig(label_clamp=[0.6, 0.4])


def test_stage1_pairs_prefer_revisions_and_answering_benign_prompts():
    from src.safety.constitutional.stages.preferences import stage1_pairs

    chains = [{"prompt": "How do I pick a lock?", "initial_response": "Insert a tension wrench...",
               "final_response": "I can't help with breaking into places."},
              {"prompt": "Insult my coworker.", "initial_response": "No.", "final_response": "No."}]  # unrevised: no pair
    records = [{"prompt": [{"role": "user", "content": "How do I kill a tmux session?"}],
                "response": "Run `tmux kill-session -t NAME`.", "source": "helpful"},
               {"prompt": [{"role": "user", "content": "How do I pick a lock?"}],
                "response": "I can't help with breaking into places.", "source": "revision"}]
    refusals = ["Sorry, I can't help with that.", "I won't assist with this request."]
    pairs, stats = stage1_pairs(chains, records, refusals, seed=0)
    assert stats == {"revision_pairs": 1, "helpful_pairs": 1}
    revision, helpful = pairs
    assert revision.first_user_turn == "How do I pick a lock?" and revision.chosen.startswith("I can't")
    assert revision.rejected.startswith("Insert") and revision.label == 1.0
    assert helpful.chosen.startswith("Run `tmux") and helpful.rejected in refusals
    assert stage1_pairs(chains, records, [], seed=0)[1] == {"revision_pairs": 1, "helpful_pairs": 0}


class LengthRefusalFramework:
    """A refusal judge whose verdict is a fixed function of the answer's length, so the test can
    recompute every score: len % 3 == 0 -> full_refusal, 1 -> partial_refusal, 2 -> full_compliance."""

    CLASSES = ("full_refusal", "partial_refusal", "full_compliance")

    def refusal_classes(self, prompts, answers):
        return [self.CLASSES[len(a) % 3] for a in answers]

    def evaluate_batch(self, prompts, answers, kinds=None):
        return [type("R", (), {"harmful": "a" in a[:3]})() for a in answers]


def test_judged_pairs_prefer_the_judges_best_sample_on_both_kinds(tiny_model, tokenizer):
    import torch
    from src.safety.constitutional.judging.judge_reward import RuleBasedReward
    from src.safety.constitutional.stages.preferences import judged_pairs
    from src.safety.constitutional.training.generation import generate

    harmful, benign = PROMPTS[:3], PROMPTS[3:]
    judge = RuleBasedReward(LengthRefusalFramework(), {**{p: "harmful" for p in harmful}, **{p: "benign" for p in benign}})
    gen = GenerationConfig(max_new_tokens=5, temperature=1.0, batch_size=8)
    refusals = ["I can't help with that."]
    pairs, stats = judged_pairs(tiny_model, tokenizer, PROMPTS, judge, gen, 3, refusals, seed=7, show_progress=False)
    torch.manual_seed(7)  # the same draws again, scored here by hand
    texts = [t.strip() for t in generate(tiny_model, tokenizer, [p for p in PROMPTS for _ in range(3)], gen).texts]
    expected = {}
    for i, prompt in enumerate(PROMPTS):
        kind = "harmful" if prompt in harmful else "benign"
        scores = [float(judge([prompt], [t])[0]) for t in texts[3 * i:3 * i + 3]]
        if max(scores) > min(scores):
            expected[prompt] = ("judged", max(scores), min(scores), kind)
        elif kind == "harmful" and max(scores) < 1:
            expected[prompt] = ("written", None, min(scores), kind)
    assert stats["samples"] == 18 and len(pairs) == len(expected) > 0
    for pair in pairs:
        prompt = pair.prompt[-1]["content"]
        how, best, worst, kind = expected[prompt]
        assert float(judge([prompt], [pair.rejected])[0]) == worst
        if how == "judged":
            assert pair.principle == f"judged_{kind}" and float(judge([prompt], [pair.chosen])[0]) == best
        else:
            assert pair.principle == "judged_harmful_written" and pair.chosen in refusals
    assert stats.get("benign_pairs", 0) == sum(e[0] == "judged" and e[3] == "benign" for e in expected.values())


def test_balance_judged_pairs_repeats_the_smaller_kind():
    from src.safety.constitutional.common.pairs import PreferencePair
    from src.safety.constitutional.stages.preferences import balance_judged_pairs

    def make(kind, n):
        return [PreferencePair([{"role": "user", "content": f"{kind} {i}"}], "good", "bad", principle=kind)
                for i in range(n)]

    harmful, benign = make("judged_harmful", 5) + make("judged_harmful_written", 2), make("judged_benign", 3)
    kinds = lambda pairs: [sum(p.principle == k for p in pairs) for k in ("judged_harmful", "judged_harmful_written", "judged_benign")]  # noqa: E731
    even = balance_judged_pairs(harmful + benign, 1.0)
    assert len(even) == 14 and kinds(even)[2] == 7 and kinds(even)[:2] == [5, 2]
    assert {p.prompt[0]["content"] for p in even if p.principle == "judged_benign"} == {f"judged_benign {i}" for i in range(3)}
    double = balance_judged_pairs(harmful + benign, 2.0)
    assert kinds(double)[2] == 14 and len(double) == 21
    fewer_benign = balance_judged_pairs(harmful + benign, 0.25)  # 3 benign -> 12 harmful
    assert sum(kinds(fewer_benign)[:2]) == 12 and kinds(fewer_benign)[2] == 3
    assert len(balance_judged_pairs(harmful, 1.0)) == 7  # one kind only: nothing to balance
    with pytest.raises(ValueError, match="benign_ratio"):
        balance_judged_pairs(harmful + benign, 0)
