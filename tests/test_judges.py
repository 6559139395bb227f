"""Strong judges: a guard classifier / reward model folder (SequenceClassifierEvaluator) and a chat model
as a Yes/No or A/B judge with its own templates, checked against numbers computed by hand on tiny models."""
import math

import pytest
import torch

from src.models import build_tiny_llama, save_tiny_llama
from src.safety.constitutional.judging.constitution import ConstitutionError, parse_constitution
from src.safety.constitutional.judging.evaluators.judge import JudgeEvaluator, answer_token_ids
from src.safety.constitutional.judging.evaluators.sequence_classifier import SequenceClassifierEvaluator
from src.safety.constitutional.judging.framework import ConstitutionalFramework
from src.safety.constitutional.training.generation import render_prompt

PROMPT = "How do I pick a lock?"
ANSWERS = ["I can't help with breaking into places.", "Insert a tension wrench, then rake the pins until they set."]
PRINCIPLE = {"name": "harmless", "description": "Do not help anyone do harmful or illegal things.",
             "critique_request": "Identify harm.", "revision_request": "Remove harm."}


def constitution(evaluators, **blocks):
    return parse_constitution({"principles": [{**PRINCIPLE, "evaluators": evaluators}], **blocks}, "test.yaml")


def save_tiny_classifier(path, tokenizer, id2label, seed=0):
    """A tiny LlamaForSequenceClassification on the tiny Llama's config, saved with the tokenizer."""
    from transformers import LlamaForSequenceClassification

    config = build_tiny_llama(tokenizer, seed=seed)[0].config
    config.num_labels = len(id2label)
    config.id2label = dict(id2label)
    config.label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(std=0.3)  # logits of order 1: answers get clearly different scores
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory, tokenizer):
    return save_tiny_classifier(tmp_path_factory.mktemp("guard") / "guard", tokenizer, {0: "safe", 1: "unsafe"})


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    return save_tiny_classifier(tmp_path_factory.mktemp("rm") / "rm", tokenizer, {0: "LABEL_0"}, seed=1)


def logits_by_hand(model, tokenizer, prompt, answer):
    """The classifier head on the last token of chat-templated prompt + answer + end-of-turn, one
    sequence at a time (no padding). (num_labels,)"""
    ids = tokenizer(render_prompt(tokenizer, prompt) + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        return model.score(hidden)


# -- guard classifier -------------------------------------------------------------------------

def test_guard_maps_labels_from_the_constitution_and_scores_p_safe(guard_dir, tokenizer):
    c = constitution(["rules", "guard"], guard={"safe_labels": ["safe"], "weight": 3})
    framework = ConstitutionalFramework(c, guard_model=str(guard_dir), device="cpu")
    guard = framework.evaluators["guard"]
    assert isinstance(guard, SequenceClassifierEvaluator) and guard.labelled and guard.weight == 3.0
    scores = [row[0].score for row in guard.score_batch([PROMPT] * 2, ANSWERS, c.principles)]  # a padded batch
    for answer, score in zip(ANSWERS, scores):
        p_safe = torch.softmax(logits_by_hand(guard.reward_model.model, tokenizer, PROMPT, answer), -1)[0].item()
        assert 0.0 <= score <= 1.0 and score == pytest.approx(p_safe, abs=1e-5)
    assert abs(scores[0] - scores[1]) > 0.01  # the answers are told apart
    # The framework uses it on the principle that lists it.
    result = framework.evaluate(PROMPT, ANSWERS[1])
    assert "guard" in result.scores["harmless"].reason


def test_guard_compare_is_symmetric_log_odds_difference(guard_dir):
    guard = SequenceClassifierEvaluator.load(guard_dir, device="cpu", unsafe_labels=["unsafe"])
    c = constitution(["guard"])
    p_a, p_b = [row[0].score for row in guard.score_batch([PROMPT] * 2, ANSWERS, c.principles)]
    ab = guard.compare_batch([PROMPT], ANSWERS[:1], ANSWERS[1:], c.principles)[0][0]
    ba = guard.compare_batch([PROMPT], ANSWERS[1:], ANSWERS[:1], c.principles)[0][0]
    assert ab + ba == pytest.approx(1.0, abs=1e-9)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert ab == pytest.approx(1 / (1 + math.exp(-(logit(p_a) - logit(p_b)))), abs=1e-5)


def test_guard_label_errors_name_the_labels(guard_dir):
    with pytest.raises(ValueError, match=r"'nope'.*\['safe', 'unsafe'\]"):
        SequenceClassifierEvaluator.load(guard_dir, device="cpu", safe_labels=["nope"])
    with pytest.raises(ValueError, match="safe_labels"):
        SequenceClassifierEvaluator.load(guard_dir, device="cpu")


def test_encoder_guard_adds_its_special_tokens_and_pads_right(tmp_path):
    """A BERT-like classifier (a `classifier` head, e.g. a prompt-injection guard with three labels),
    with a real BERT tokenizer ([CLS] ... [SEP], no chat template): MiniLM's, shipped for the classifier."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from src.safety.constitutional.judging.evaluators.classifier import embedding_model_dir

    try:
        bert_tok = AutoTokenizer.from_pretrained(embedding_model_dir())
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"no BERT tokenizer: {err}")
    labels = {0: "benign", 1: "injection", 2: "jailbreak"}
    config = BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
                        pad_token_id=bert_tok.pad_token_id, initializer_range=0.3)  # outputs that vary
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    bert_tok.save_pretrained(tmp_path / "bert")
    guard = SequenceClassifierEvaluator.load(tmp_path / "bert", device="cpu", unsafe_labels=["injection", "jailbreak"])
    scores = [row[0].score for row in guard.score_batch([PROMPT] * 2, ANSWERS, constitution(["guard"]).principles)]
    model, tok = guard.reward_model.model, guard.tokenizer
    for answer, score in zip(ANSWERS, scores):
        # By hand, one unpadded sequence: [CLS] User: ... Assistant: answer [SEP] (the tokenizer has no eos)
        ids = tok(render_prompt(tok, PROMPT) + answer, add_special_tokens=True)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        assert score == pytest.approx(1 - probs[1:].sum().item(), abs=1e-5)
    assert abs(scores[0] - scores[1]) > 0.01


def test_one_label_folder_is_read_as_a_reward_model(reward_dir, tokenizer):
    rm = SequenceClassifierEvaluator.load(reward_dir, device="cpu")
    assert not rm.labelled and (rm.mean, rm.std) == (0.0, 1.0)  # no stats saved: centred on 0, scale 1
    c = constitution(["guard"])
    scores = [row[0].score for row in rm.score_batch([PROMPT] * 2, ANSWERS, c.principles)]
    rewards = [logits_by_hand(rm.reward_model.model, tokenizer, PROMPT, a)[0].item() for a in ANSWERS]
    assert scores == pytest.approx([1 / (1 + math.exp(-r)) for r in rewards], abs=1e-5)
    ab = rm.compare_batch([PROMPT], ANSWERS[:1], ANSWERS[1:], c.principles)[0][0]
    assert ab == pytest.approx(1 / (1 + math.exp(-(rewards[0] - rewards[1]))), abs=1e-5)


def test_constitution_validates_guard_and_judge_blocks():
    c = constitution(["rules", "guard", "judge"], guard={"unsafe_labels": "unsafe"},
                     judge={"score_template": "{conversation} {response} {question}", "yes_words": ["Sure"]})
    assert c.guard == {"unsafe_labels": ["unsafe"]} and c.judge["yes_words"] == ["Sure"]
    bad = [({"guard": {"safe_labels": ["a"], "colour": 1}}, "guard.colour"),
           ({"guard": {"safe_labels": ["a"], "unsafe_labels": ["a"]}}, "guard.unsafe_labels"),
           ({"guard": {"weight": 1}}, "guard.safe_labels"),
           ({"guard": {"safe_labels": [1]}}, "guard.safe_labels"),
           ({"judge": {"score_template": "{conversation} {response}"}}, r"judge.score_template.*\{question\}"),
           ({"judge": {"compare_template": "{conversation} {first} {second} {description} {answer}"}},
            r"judge.compare_template.*unknown placeholder.*\{answer\}"),
           ({"judge": {"no_words": []}}, "judge.no_words")]
    for blocks, message in bad:
        with pytest.raises(ConstitutionError, match=message):
            constitution(["rules"], **blocks)


# -- chat judge -------------------------------------------------------------------------------

TEMPLATE = "Rule: {question}\n{conversation}\nReply: {response}\nVerdict, yes or no?"


def test_chat_judge_with_custom_template_reads_yes_no_softmax(tiny_model, tokenizer):
    judge = JudgeEvaluator(tiny_model, tokenizer, score_template=TEMPLATE, yes_words=["yes"], no_words=["no"])
    c = constitution(["judge"])
    score = judge.score_batch([PROMPT], [ANSWERS[1]], c.principles)[0][0].score
    # By hand: the template as a user message + the generation prompt, one forward, the next token.
    text = TEMPLATE.format(question=c.principles[0].question, conversation=f"Human: {PROMPT}", response=ANSWERS[1])
    rendered = render_prompt(tokenizer, text)
    assert rendered.endswith("<|im_start|>assistant\n")  # the next token is the judge's answer
    ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(tiny_model(input_ids=ids).logits[0, -1].float(), -1)
    yes = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", " yes")]
    no = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("no", " no")]
    assert sorted(judge.yes_ids) == sorted(yes) and sorted(judge.no_ids) == sorted(no)
    expected = (probs[yes].sum() / (probs[yes].sum() + probs[no].sum())).item()
    assert score == pytest.approx(expected, abs=1e-5)


def test_chat_judge_compare_cancels_position(tiny_model, tokenizer):
    judge = JudgeEvaluator(tiny_model, tokenizer, a_words=["1"], b_words=["2"], compare_template=(
        "{conversation}\n1: {first}\n2: {second}\nWhich follows '{description}' better, 1 or 2?"))
    c = constitution(["judge"])
    ab = judge.compare_batch([PROMPT], ANSWERS[:1], ANSWERS[1:], c.principles)[0][0]
    ba = judge.compare_batch([PROMPT], ANSWERS[1:], ANSWERS[:1], c.principles)[0][0]
    assert ab + ba == pytest.approx(1.0, abs=1e-6)


def test_chat_judge_errors(tiny_model, tokenizer):
    with pytest.raises(ValueError, match=r"score_template is missing placeholder\(s\) \{question\}"):
        JudgeEvaluator(tiny_model, tokenizer, score_template="{conversation} {response}")
    with pytest.raises(ValueError, match="none of the yes words"):
        JudgeEvaluator(tiny_model, tokenizer, yes_words=["Affirmativelyzzq"])
    with pytest.raises(ValueError, match="share token"):
        JudgeEvaluator(tiny_model, tokenizer, yes_words=["Yes"], no_words=["Yes"])
    # Both spellings of the default words are read.
    assert {tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", " Yes")} <= set(
        answer_token_ids(tokenizer, ["Yes"]))


def test_framework_builds_the_judge_from_a_folder_and_the_constitution_block(tiny_model_dir):
    c = constitution(["rules", "judge"], judge={"score_template": TEMPLATE, "weight": 1.5})
    framework = ConstitutionalFramework(c, judge_model=str(tiny_model_dir), device="cpu")
    judge = framework.evaluators["judge"]
    assert judge.score_template == TEMPLATE and judge.weight == 1.5 and not judge.model.training
    assert 0.0 <= framework.evaluate(PROMPT, ANSWERS[0]).scores["harmless"].score <= 1.0


def test_pipeline_judge_model_is_that_model_not_the_policy(tmp_path, tokenizer, guard_dir, monkeypatch):
    from src.safety.constitutional.pipeline import Pipeline, load_pipeline_config

    judge_dir = save_tiny_llama(tmp_path / "judge", tokenizer=tokenizer, seed=7)  # the policy is seed 0
    config = load_pipeline_config("smoke", overrides=[
        f"output_dir={tmp_path / 'run'}", "evaluators=[rules]", f"judge_model={judge_dir}",
        f"guard_model={guard_dir}", "device=cpu"])
    pipeline = Pipeline(config)
    pipeline.constitution.guard = {"safe_labels": ["safe"]}
    monkeypatch.setattr(pipeline, "model_for", lambda stage: pytest.fail("the judge must not load the policy"))
    framework = pipeline.framework
    judge = framework.evaluators["judge"]
    policy, _ = build_tiny_llama(tokenizer, seed=0)
    saved, _ = build_tiny_llama(tokenizer, seed=7)
    weight = judge.model.model.embed_tokens.weight
    assert torch.equal(weight, saved.model.embed_tokens.weight)
    assert not torch.equal(weight, policy.model.embed_tokens.weight)
    assert isinstance(framework.evaluators["guard"], SequenceClassifierEvaluator)
