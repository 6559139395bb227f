"""The toolkit's one generation path: batched, KV-cached, left-padded, chat-templated.

Every stage (critique/revision, preference sampling, PPO rollouts, evaluation) calls `generate`.
It returns token ids and masks as well as text, so RL code never re-tokenises decoded text
(re-tokenising is lossy and would score different tokens from the ones sampled).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from src.models.precision import decoding_matmuls, sampling_twin
from src.models.threads import adapt_threads

from ..common import distributed as ddp

log = logging.getLogger(__name__)
_SHARD_ACROSS_RANKS = False  # set by `sharded_across_ranks()`

Message = dict
Prompt = Union[str, Sequence[Message]]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    batch_size: int = 16
    max_prompt_tokens: int = 512
    truncate_prompts: bool = True  # False: over-long prompts raise instead of losing their start
    system_prompt: Optional[str] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"GenerationConfig.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"GenerationConfig.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class GenerationOutput:
    """Per-sample results. Tensors are right-padded over the answer, left-padded over the prompt."""

    prompt_ids: torch.Tensor        # (batch, prompt_len), left-padded
    prompt_mask: torch.Tensor       # (batch, prompt_len)
    response_ids: torch.Tensor      # (batch, response_len), right-padded with pad_token_id
    response_mask: torch.Tensor     # (batch, response_len), 1 up to and including end-of-turn
    texts: List[str]                # decoded answers, special tokens stripped
    finished: torch.Tensor          # (batch,) bool: ended with end-of-turn rather than the length limit
    logprobs: Optional[torch.Tensor] = None  # (batch, response_len) if requested
    prompt_texts: List[str] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def __len__(self) -> int:
        return len(self.texts)


def eos_token_ids(model, tokenizer) -> List[int]:
    """End-of-turn ids: the tokenizer's eos plus whatever the model's generation config lists."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def to_messages(prompt: Prompt, system_prompt: Optional[str] = None) -> List[Message]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt: every prompt must contain text")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = list(prompt)
    else:
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(tokenizer, prompt: Prompt, system_prompt: Optional[str] = None) -> str:
    """Chat-template text ending where the assistant's answer starts."""
    messages = to_messages(prompt, system_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: plain transcript.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + "Assistant:"


def encode_prompts(tokenizer, prompts: Sequence[Prompt], config: GenerationConfig):
    """Chat-templated token ids per prompt (unpadded); over-long prompts lose their start or raise."""
    if len(prompts) == 0:
        raise ValueError("the prompt list is empty: give at least one prompt")
    texts = [render_prompt(tokenizer, p, config.system_prompt) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    limit = config.max_prompt_tokens
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            if not config.truncate_prompts:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, more than max_prompt_tokens={limit}; "
                                 "shorten it, raise the limit, or allow truncation")
            warnings.warn(f"prompt {i} has {len(ids)} tokens; keeping its last {limit} (max_prompt_tokens)")
            encoded[i] = ids[-limit:]
    return encoded, texts


def _pad(encoded: Sequence[List[int]], pad_token_id: int, device, left: bool):
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        if ids:
            cols = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, cols] = torch.tensor(ids)
            mask[i, cols] = 1
    return input_ids.to(device), mask.to(device)


def left_pad(encoded: Sequence[List[int]], pad_token_id: int, device=None):
    """(ids, mask), each (batch, longest), padded on the left so every row ends at the last column."""
    return _pad(encoded, pad_token_id, device, left=True)


def right_pad(encoded: Sequence[List[int]], pad_token_id: int, device=None):
    """(ids, mask), each (batch, longest), padded on the right so every row starts at column 0."""
    return _pad(encoded, pad_token_id, device, left=False)


def encode_answers(tokenizer, answers: Sequence[str], max_tokens: Optional[int] = None, device=None):
    """Right-padded answer batch (ids, mask), each (batch, longest): each answer's tokens (no special
    tokens) then end-of-turn, as a finished sampled answer ends; `max_tokens` cuts the end (end-of-turn
    kept). The layout DPO trains on and PPO's guide API scores."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    limit = None if max_tokens is None else max_tokens - len(eos)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:limit] + eos for text in answers]
    return right_pad(encoded, tokenizer.pad_token_id, device)


def encode_prompt_answers(tokenizer, prompt: Prompt, answers: Sequence[str], max_length: int,
                          system_prompt: Optional[str] = None,
                          max_answer_tokens: Optional[int] = None) -> Tuple[List[List[int]], int]:
    """The one layout in which a scalar model reads an answer (reward models, reward training, the
    reward scorer's re-tokenisation, the learned judges): the chat-templated prompt ready for the
    assistant, then the answer's tokens, then end-of-turn, so the score is read at the end-of-turn.

    Several answers to one prompt share one prompt cut. Answers keep their last tokens (an answer is
    judged by where it ends up); `max_answer_tokens` first cuts each answer's end instead (for
    judges that read an answer's opening). The prompt is cut from the left so that the longest
    sequence fits `max_length`. Returns (ids per answer, number of prompt tokens kept).
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_answer_tokens] + eos for text in answers]
    encoded = [a[-max_length:] for a in encoded]
    room = max_length - max(len(a) for a in encoded)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - room):] if room > 0 else []
    return [prompt_ids + a for a in encoded], len(prompt_ids)


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt], config: GenerationConfig, device=None):
    """Left-padded prompt batch; over-long prompts lose their start (with a warning) or raise."""
    encoded, texts = encode_prompts(tokenizer, prompts, config)
    input_ids, mask = left_pad(encoded, tokenizer.pad_token_id, device)
    return input_ids, mask, texts


def _response_mask(response_ids: torch.Tensor, eos_ids: List[int]):
    """1 for tokens up to and including the first end-of-turn; also whether that token exists."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    # tokens strictly after the first eos are padding
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long(), is_eos.any(-1)


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompt_ids, prompt_mask, config: GenerationConfig, eos_ids):
    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        use_cache=True,
    )
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if config.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = config.repetition_penalty
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    return out[:, prompt_ids.shape[1]:]


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    config: Optional[GenerationConfig] = None,
    return_logprobs: bool = False,
    show_progress: bool = False,
    desc: str = "generating",
) -> GenerationOutput:
    """Answer every prompt; batches of `config.batch_size`, each trimmed to its own longest prompt.

    Log-probs (if asked) come from `logprobs.sequence_logprobs` at the sampling temperature, one
    forward over each batch: the same numbers PPO uses later, not the warped scores of `generate`.
    """
    config = config or GenerationConfig()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt list is empty: give at least one prompt")
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    encoded, all_texts = encode_prompts(tokenizer, prompts, config)
    # More prompts than one batch: batch them by length so each batch pads (and attends) over
    # little more than its own prompts, then restore the caller's order. One batch: order kept.
    order = list(range(len(prompts)))
    if len(prompts) > config.batch_size:
        order.sort(key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    sampler = sampling_twin(model)  # bf16 weights for decoding when the compute precision is bf16
    chunks = []
    starts = list(range(0, len(prompts), config.batch_size))
    sharded = _SHARD_ACROSS_RANKS and ddp.world_size() > 1
    if sharded:  # whole batches per rank: each batch is computed exactly as one process would
        starts = starts[ddp.rank()::ddp.world_size()]
    with _rank_sampling_rng(sharded and config.do_sample, device):
        for start in tqdm(starts, desc=desc, disable=not show_progress or len(starts) < 2, leave=False):
            idx = order[start:start + config.batch_size]
            chunks.append(_answer_batch(model, sampler, tokenizer, [encoded[i] for i in idx],
                                        [all_texts[i] for i in idx], config, eos_ids, device, return_logprobs))
    if was_training:
        model.train()
    if sharded:
        chunks = _gather_batches(starts, chunks, device)
    merged = _merge(chunks, tokenizer)
    if order != sorted(order):
        merged = _select(merged, _inverse(order))
    return merged


def _answer_batch(model, sampler, tokenizer, encoded, p_texts, config, eos_ids, device, return_logprobs):
    from .logprobs import sequence_logprobs

    p_ids, p_mask = left_pad(encoded, tokenizer.pad_token_id, device)
    adapt_threads()  # src/models/threads.py: fewer threads while other processes use the cores
    with decoding_matmuls(sampler):  # few-row products in the faster layout (CPU, fp32)
        r_ids = _generate_batch(sampler, tokenizer, p_ids, p_mask, config, eos_ids)
    r_mask, finished = _response_mask(r_ids, eos_ids)
    r_ids = torch.where(r_mask.bool(), r_ids, tokenizer.pad_token_id)
    logprobs = None
    if return_logprobs:
        temperature = config.temperature if config.do_sample else 1.0
        with torch.inference_mode():
            logprobs = sequence_logprobs(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1),
                                         response_len=r_ids.shape[1], temperature=temperature)
        logprobs = logprobs * r_mask
    return (p_ids, p_mask, r_ids, r_mask, finished, logprobs, p_texts)


@contextmanager
def sharded_across_ranks():
    """Inside this block, `generate` under torchrun splits its batches over the ranks and every rank
    receives every answer, in prompt order. The pipeline's generation-only steps (critique-revision,
    preference sampling, evaluation) run in it; RL rollouts do not (each rank already samples its own
    prompts). Greedy answers equal one process's exactly: a batch is the same batch on any rank.
    Sampled answers differ (each rank draws from its own stream, `distributed.sampling_seed`)."""
    global _SHARD_ACROSS_RANKS
    before, _SHARD_ACROSS_RANKS = _SHARD_ACROSS_RANKS, True
    try:
        yield
    finally:
        _SHARD_ACROSS_RANKS = before


@contextmanager
def _rank_sampling_rng(active: bool, device):
    """Sample from a rank-specific stream; afterwards every rank's global RNG is in the same state
    again (one common draw), so replicated code after the gather stays identical across ranks."""
    if not active:
        yield
        return
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(ddp.sampling_seed(seed))
        yield


def _gather_batches(starts: List[int], chunks: list, device) -> list:
    """Every rank's (start, batch) pairs, on every rank, in batch order (tensors via CPU pickles)."""
    import torch.distributed as dist

    to = lambda c, d: tuple(x.to(d) if isinstance(x, torch.Tensor) else x for x in c)  # noqa: E731
    shares = [None] * ddp.world_size()
    dist.all_gather_object(shares, [(s, to(c, "cpu")) for s, c in zip(starts, chunks)])
    return [to(c, device) for _, c in sorted((pair for share in shares for pair in share), key=lambda x: x[0])]


def _inverse(order: List[int]) -> List[int]:
    inverse = [0] * len(order)
    for position, i in enumerate(order):
        inverse[i] = position
    return inverse


def _select(out: GenerationOutput, rows: List[int]) -> GenerationOutput:
    """The rows `rows` of `out`, in that order."""
    index = torch.tensor(rows, device=out.prompt_ids.device)
    pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
    return GenerationOutput(pick(out.prompt_ids), pick(out.prompt_mask), pick(out.response_ids),
                            pick(out.response_mask), [out.texts[i] for i in rows], pick(out.finished),
                            pick(out.logprobs), [out.prompt_texts[i] for i in rows])


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _merge(chunks, tokenizer) -> GenerationOutput:
    pad = tokenizer.pad_token_id
    p_width = max(c[0].shape[1] for c in chunks)
    r_width = max(c[2].shape[1] for c in chunks)
    prompt_ids = torch.cat([_pad_to(c[0], p_width, pad, left=True) for c in chunks])
    prompt_mask = torch.cat([_pad_to(c[1], p_width, 0, left=True) for c in chunks])
    response_ids = torch.cat([_pad_to(c[2], r_width, pad, left=False) for c in chunks])
    response_mask = torch.cat([_pad_to(c[3], r_width, 0, left=False) for c in chunks])
    finished = torch.cat([c[4] for c in chunks])
    logprobs = None
    if chunks[0][5] is not None:
        logprobs = torch.cat([_pad_to(c[5], r_width, 0.0, left=False) for c in chunks])
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
             for ids, m in zip(response_ids, response_mask)]
    prompt_texts = [t for c in chunks for t in c[6]]
    return GenerationOutput(prompt_ids, prompt_mask, response_ids, response_mask, texts, finished,
                            logprobs, prompt_texts)


def generate_text(model, tokenizer, prompts: Sequence[Prompt], config: Optional[GenerationConfig] = None,
                  **kwargs) -> List[str]:
    """Convenience: just the answers' text."""
    return generate(model, tokenizer, prompts, config, **kwargs).texts
