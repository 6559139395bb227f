import pytest
import torch

from src.safety.constitutional.training.generation import GenerationConfig, generate
from src.safety.constitutional.training.logprobs import sequence_logprobs

PROMPTS = ["Name a colour.", "What is two plus two? Answer with a number and explain briefly why it is so.",
           "Say hi"]


@pytest.mark.slow
def test_batched_greedy_equals_one_by_one(default_model):
    model, tok = default_model
    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, batch_size=8)
    batched = generate(model, tok, PROMPTS, cfg)
    for i, prompt in enumerate(PROMPTS):
        single = generate(model, tok, [prompt], cfg)
        n = int(single.response_mask.sum())
        assert int(batched.response_mask[i].sum()) == n
        assert torch.equal(single.response_ids[0, :n], batched.response_ids[i, :n])
        assert single.texts[0] == batched.texts[i]


def test_logprobs_match_generation_scores(tiny_model, tokenizer):
    # Greedy tokens under temperature 1: the log-prob path must agree with generate's own scores.
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False, batch_size=4)
    out = generate(tiny_model, tokenizer, PROMPTS, cfg, return_logprobs=True)
    ids, mask = out.input_ids, out.attention_mask
    with torch.no_grad():
        direct = tiny_model(input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    P = out.prompt_ids.shape[1]
    ref = torch.log_softmax(direct[:, P - 1:-1].float(), -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref * out.response_mask, atol=1e-4, rtol=1e-4)
    # greedy => each chosen token is the argmax of its step
    assert torch.equal(direct[:, P - 1:-1].argmax(-1)[out.response_mask.bool()],
                       out.response_ids[out.response_mask.bool()])


def test_response_mask_stops_at_end_of_turn(default_model):
    model, tok = default_model
    out = generate(model, tok, ["What is 2+2?"], GenerationConfig(max_new_tokens=40, do_sample=False))
    n = int(out.response_mask[0].sum())
    assert bool(out.finished[0]) and out.response_ids[0, n - 1].item() == tok.eos_token_id
    assert (out.response_ids[0, n:] == tok.pad_token_id).all()


def test_sampling_is_seeded_and_temperature_scales_logprobs(tiny_model, tokenizer):
    torch.manual_seed(0)
    a = generate(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5, temperature=0.7))
    torch.manual_seed(0)
    b = generate(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=5, temperature=0.7),
                 return_logprobs=True)
    assert torch.equal(a.response_ids, b.response_ids)
    hot = sequence_logprobs(tiny_model, b.input_ids, b.attention_mask, b.response_ids.shape[1], temperature=0.7)
    torch.testing.assert_close(hot * b.response_mask, b.logprobs)


def test_bad_prompts_are_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model, tokenizer, [])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny_model, tokenizer, ["   "])
    with pytest.raises(TypeError, match="string or a list"):
        generate(tiny_model, tokenizer, [42])
    long = "word " * 300
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        generate(tiny_model, tokenizer, [long], GenerationConfig(max_prompt_tokens=50, truncate_prompts=False))
    with pytest.warns(UserWarning, match="keeping its last 50"):
        out = generate(tiny_model, tokenizer, [long], GenerationConfig(max_prompt_tokens=50, max_new_tokens=2))
    assert out.prompt_ids.shape[1] == 50


def test_many_prompts_are_batched_by_length_and_returned_in_order(tiny_model, tokenizer):
    # 5 prompts, batch 2: generation sorts them by length, the result must come back in input order
    prompts = ["Hi", "word " * 40, "Tell me a story about a dog.", "word " * 20, "Why?"]
    cfg = GenerationConfig(max_new_tokens=4, do_sample=False, batch_size=2)
    out = generate(tiny_model, tokenizer, prompts, cfg, return_logprobs=True)
    for i, prompt in enumerate(prompts):
        single = generate(tiny_model, tokenizer, [prompt], cfg, return_logprobs=True)
        n = int(single.response_mask.sum())
        assert out.prompt_texts[i] == single.prompt_texts[0]
        assert torch.equal(out.response_ids[i, :n], single.response_ids[0, :n]), i
        torch.testing.assert_close(out.logprobs[i, :n], single.logprobs[0, :n], atol=1e-4, rtol=1e-4)
        m = int(single.prompt_mask.sum())
        assert torch.equal(out.prompt_ids[i][out.prompt_mask[i].bool()], single.prompt_ids[0, -m:])


def test_sequence_logprobs_equal_a_plain_full_forward_values_and_gradients(tiny_model, tokenizer):
    from src.models.heads import position_ids_from_mask
    torch.manual_seed(0)
    out = generate(tiny_model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0.9))
    ids, mask, R = out.input_ids, out.attention_mask, out.response_ids.shape[1]

    fast = sequence_logprobs(tiny_model, ids, mask, R, temperature=0.9)
    fast.sum().backward()
    fast_grad = tiny_model.lm_head.weight.grad.clone()
    tiny_model.zero_grad()

    logits = tiny_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    slow = torch.log_softmax(logits[:, -R - 1:-1] / 0.9, -1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    slow.sum().backward()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, tiny_model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
