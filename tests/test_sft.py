import random

import pytest
import torch

from src.models import build_tiny_llama
from src.safety.constitutional.common.checkpoint import load_checkpoint
from src.safety.constitutional.common.io import read_jsonl
from src.safety.constitutional.training.batching import length_bucketed_batches
from src.safety.constitutional.training.generation import render_prompt
from src.safety.constitutional.training.optim import lr_factor
from src.safety.constitutional.training.sft import IGNORE_INDEX, SFTConfig, SFTTrainer, collate, tokenize_example

RECORDS = [
    {"prompt": "How do I pick a lock?", "response": "I can't help with breaking into places."},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"prompt": "What is two plus two?", "response": "Two plus two is four."},
    {"prompt": [{"role": "user", "content": "Tell me a secret"}], "response": "I don't have secrets to share."},
    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof, the garden drinks slowly."},
    {"prompt": "Say hi", "response": "Hi!"},
]


def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(tokenizer):
    example, truncated = tokenize_example(tokenizer, "Name a colour.", "Blue.", max_seq_len=512)
    assert not truncated
    prompt_ids = tokenizer(render_prompt(tokenizer, "Name a colour."), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    # The trained-on tokens are the answer and the end-of-turn marker, nothing else.
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Blue.<|im_end|>"
    # The whole sequence is the chat template's rendering of the finished conversation.
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."},
                                          {"role": "assistant", "content": "Blue."}], tokenize=False)
    assert tokenizer.decode(example.input_ids) == full.rstrip("\n")

    # Dynamic padding: padded positions carry no label and no attention.
    other, _ = tokenize_example(tokenizer, "Say hi", "Hello there, how are you today?", max_seq_len=512)
    batch = collate([example, other], tokenizer.pad_token_id)
    width = max(len(example), len(other))
    assert batch["input_ids"].shape == (2, width)
    short = 0 if len(example) < len(other) else 1
    n = min(len(example), len(other))
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all() and (batch["attention_mask"][short, :n] == 1).all()


def test_truncation_keeps_answer_and_warns(tokenizer):
    example, truncated = tokenize_example(tokenizer, "word " * 200, "Short answer.", max_seq_len=64)
    assert truncated and len(example) == 64
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "Short answer.<|im_end|>"


def test_length_bucketing_is_seeded_and_covers_every_example():
    lengths = [5, 50, 7, 40, 9, 30, 11, 20, 3, 60]

    def order(seed, epoch):  # how SFT seeds it: a function of (seed, epoch) alone
        return length_bucketed_batches(lengths, 2, random.Random(f"sft-data-order:{seed}:{epoch}"), 5,
                                       longest_first=True)

    a = order(1, 0)
    assert a == order(1, 0)
    assert a != order(1, 1)
    assert sorted(i for b in a for i in b) == list(range(10))
    # within one chunk, batches group similar lengths: pairs are adjacent in sorted order
    ranks = {i: r for r, i in enumerate(sorted(range(10), key=lambda i: -lengths[i]))}
    assert all(abs(ranks[b[0]] - ranks[b[1]]) == 1 for b in a)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 2, "cosine", 0.0) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(x >= y for x, y in zip(f[2:], f[3:])) and f[-1] < 0.1
    assert lr_factor(9, 10, 0, "linear", 0.2) == pytest.approx(0.2 + 0.8 * (1 - 9 / 10))
    assert [lr_factor(s, 10, 4, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0, "step")


def test_loss_decreases_and_checkpoint_is_a_plain_hf_model(tiny_model, tokenizer, tmp_path):
    log_file = tmp_path / "sft_log.jsonl"
    cfg = SFTConfig(output_dir=str(tmp_path / "run"), num_epochs=6, batch_size=6, learning_rate=1e-2,
                    warmup_ratio=0.1, log_file=str(log_file), show_progress=False)
    metrics = SFTTrainer(tiny_model, tokenizer, cfg).train(RECORDS, eval_records=RECORDS)
    assert metrics["steps"] == 6 and metrics["bad_steps"] == 0
    assert metrics["eval_loss_after"] < 0.8 * metrics["eval_loss_before"]
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    events = [r["event"] for r in read_jsonl(log_file)]
    assert events.count("train") == 6 and events[0] == "eval" and events[-1] == "done"

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = metrics["model_dir"]
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).eos_token == tokenizer.eos_token
    for (name, a), b in zip(tiny_model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    state = load_checkpoint(metrics["checkpoint"], restore_rng=False).trainer_state
    assert state["step"] == 6 and state["data_seed"] == 0 and "optimizer" in state and "scheduler" in state


class _Interrupt(Exception):
    pass


def test_resume_from_mid_run_checkpoint_gives_identical_weights(tokenizer, tmp_path, monkeypatch):
    def config(name):
        # 6 records -> 5 train + 1 eval; batches of 2 -> 3 batches; 2 per step -> 2 steps/epoch, 2 epochs
        return SFTConfig(output_dir=str(tmp_path / name), num_epochs=2, batch_size=2, grad_accum_steps=2,
                         bucket_batches=2, learning_rate=1e-3, eval_fraction=0.2, checkpoint_every=2,
                         keep_last=5, show_progress=False, seed=3)

    full_model, _ = build_tiny_llama(tokenizer, seed=0)
    full = SFTTrainer(full_model, tokenizer, config("full")).train(RECORDS)
    assert full["steps"] == 4

    # Same run, killed during step 4 (after the step-2 checkpoint was written) ...
    model, _ = build_tiny_llama(tokenizer, seed=0)
    trainer = SFTTrainer(model, tokenizer, config("interrupted"))
    original = SFTTrainer._train_step

    def dying_step(self, group, examples, optimizer, state):
        if state["step"] == 3:
            raise _Interrupt()
        return original(self, group, examples, optimizer, state)

    monkeypatch.setattr(SFTTrainer, "_train_step", dying_step)
    with pytest.raises(_Interrupt):
        trainer.train(RECORDS)
    monkeypatch.setattr(SFTTrainer, "_train_step", original)

    # ... and resumed in a fresh process-like state: new model object, other RNG state.
    torch.manual_seed(1234)
    resumed_model, _ = build_tiny_llama(tokenizer, seed=99)
    resumed = SFTTrainer(resumed_model, tokenizer, config("interrupted")).train(
        RECORDS, resume_from=tmp_path / "interrupted")
    assert resumed["steps"] == 4
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["eval_loss_before"] == full["eval_loss_before"]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_different_data(tiny_model, tokenizer, tmp_path):
    cfg = SFTConfig(output_dir=str(tmp_path / "run"), num_epochs=1, batch_size=4, show_progress=False)
    SFTTrainer(tiny_model, tokenizer, cfg).train(RECORDS)
    with pytest.raises(ValueError, match="different SFT data"):
        SFTTrainer(tiny_model, tokenizer, cfg).train(RECORDS[:4], resume_from=tmp_path / "run")


def test_nan_loss_step_is_skipped_and_counted(tiny_model, tokenizer, tmp_path):
    calls = {"n": 0}

    def poison_second_forward(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    # the LM head: SFT calls it directly on answer positions (and through the model's forward otherwise)
    handle = tiny_model.get_output_embeddings().register_forward_hook(poison_second_forward)
    cfg = SFTConfig(output_dir=str(tmp_path / "run"), num_epochs=2, batch_size=3, learning_rate=1e-3,
                    show_progress=False, log_file=str(tmp_path / "log.jsonl"))
    metrics = SFTTrainer(tiny_model, tokenizer, cfg).train(RECORDS, eval_records=[])
    assert metrics["steps"] == 4 and metrics["bad_steps"] == 1
    state = load_checkpoint(metrics["checkpoint"], restore_rng=False).trainer_state
    assert [step for step, _ in state["train_loss"]] == [1, 3, 4] and state["bad_steps"] == 1
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())
    assert sum(r["event"] == "bad_step" for r in read_jsonl(tmp_path / "log.jsonl")) == 1

    calls["n"] = 0
    cfg.max_bad_steps = 0
    cfg.output_dir = str(tmp_path / "run2")
    with pytest.raises(RuntimeError, match="max_bad_steps=0"):
        SFTTrainer(tiny_model, tokenizer, cfg).train(RECORDS, eval_records=[])
    handle.remove()


def test_bad_inputs_give_clear_errors(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        SFTConfig(lr_schedule="step")
    trainer = SFTTrainer(tiny_model, tokenizer, SFTConfig(output_dir=str(tmp_path), show_progress=False))
    with pytest.raises(ValueError, match="no SFT training records"):
        trainer.train([])
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        trainer.train([{"prompt": "hi"}])


def test_answer_only_lm_head_gives_the_full_logits_loss(tiny_model, tokenizer, tmp_path):
    from src.safety.constitutional.training.sft import tokenize_records
    records = [{"prompt": "Name a colour.", "response": "Blue."},
               {"prompt": "What is two plus two? Explain.", "response": "Four, because 2 + 2 = 4."}]
    trainer = SFTTrainer(tiny_model, tokenizer, SFTConfig(output_dir=str(tmp_path), show_progress=False))
    batch = collate(tokenize_records(tokenizer, records, 128, None), tokenizer.pad_token_id)
    loss, n = trainer._token_losses(batch)
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("long_rows", [False, True])  # short examples: matmul attention; long: SDPA
def test_packed_rows_give_the_loss_and_gradients_of_padded_ones(tokenizer, long_rows):
    """Padding-free: all examples back to back in one row, attention within each, own positions: the
    same loss and gradients as one padded row per example."""
    from src.safety.constitutional.training.sft import tokenize_records
    records = RECORDS + [{"prompt": "Explain tides " * (120 if long_rows else 45), "response": "The moon pulls. " * 8}]
    examples = tokenize_records(tokenizer, records, 512, None)
    assert (max(map(len, examples)) > 256) == long_rows
    model, _ = build_tiny_llama(tokenizer, seed=0)
    trainer = SFTTrainer(model, tokenizer, SFTConfig(output_dir="unused", show_progress=False))
    results = []
    for pack in (False, True):
        batch = collate(examples, tokenizer.pad_token_id, pack=pack)
        if pack:  # no padding at all
            assert batch["input_ids"].numel() == sum(map(len, examples))
        model.zero_grad()
        loss, n = trainer._token_losses(batch)
        loss.backward()
        results.append((batch["input_ids"].shape[0], loss.detach(), n, [p.grad.clone() for p in model.parameters()]))
    (rows_p, loss_p, n_p, grads_p), (rows_k, loss_k, n_k, grads_k) = results
    assert rows_p == len(examples) and rows_k == 1 and n_k == n_p
    torch.testing.assert_close(loss_k, loss_p, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads_k, grads_p):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
