"""The toolkit's one log-prob path: per-token log-probabilities of given tokens under a model."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from src.models.attention import attention_for, can_pack, packed_attention
from src.models.heads import backbone_of, position_ids_from_mask
from src.models.precision import autocast


def rescales_logits(config) -> bool:
    """Models whose causal-LM forward changes the head's output (soft-capping, scaling)."""
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def lm_logits(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], positions: torch.Tensor,
              position_ids: Optional[torch.Tensor] = None, cu_seq_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 logits at `positions` only: a 1-D index of columns (same for every row) -> (batch, n, vocab),
    or a boolean (batch, seq) mask -> (selected, vocab). `position_ids` default to the mask's (left
    padding skipped). A padding-free packed row (SFT's collate) brings its own `position_ids` and the
    sequences' cumulative lengths `cu_seq_lens`, and no mask (`attention.packed_attention`).

    Only those positions go through the LM head: with a 49k vocabulary the head costs more than the
    whole 135M backbone on the prompt. Under bf16 autocast the head runs in bf16 too and the
    log-softmax in fp32: measured on SmolLM2-135M's sampled answers, log-probs then differ from full
    fp32 by 0.031 nats per token on average (0.022 with an fp32 head, which cost 7% of a PPO iteration;
    old and new log-probs in the PPO ratio come from this same path, so the ratio starts at exactly 1).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    by_column = positions.dtype != torch.bool
    packed = {}
    if cu_seq_lens is not None:
        if not can_pack(model):
            raise ValueError("a padding-free packed batch needs eager, SDPA or flash attention and no gradient "
                             "checkpointing; collate it padded (pack=False)")
        longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
        packed = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
                  "max_length_k": longest}
    kernel = packed_attention(model) if packed else attention_for(model, input_ids)
    with autocast(input_ids.device), kernel:
        if head is None or rescales_logits(getattr(model, "config", None)):  # the model's own head
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, **({"logits_to_keep": positions} if by_column else {}), **packed)
            return (out.logits if by_column else out.logits[positions]).float()
        hidden = backbone_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False, **packed).last_hidden_state
        return head(hidden[:, positions] if by_column else hidden[positions]).float()


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_grad: bool = True,
) -> torch.Tensor | Tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the last `response_len` tokens of each row. (batch, response_len)

    `input_ids` is prompt (left-padded) + answer (right-padded), so every answer starts at the same
    column. Logits are divided by `temperature` so the numbers match the distribution sampled from.
    With `return_entropy`, also the entropy of that distribution at each answer position;
    `entropy_grad=False` computes it outside autograd (for logging only: a full-vocabulary
    log-softmax kept in the graph costs memory and backward time for nothing).
    """
    # The logits predicting the answer: positions W-R-1 .. W-2. Selecting them before the LM head
    # (rather than slicing the logits after it) spares the backward a (batch, R, vocab) zero-fill.
    width = input_ids.shape[1]
    keep = torch.arange(width - response_len - 1, width - 1, device=input_ids.device)
    logits = lm_logits(model, input_ids, attention_mask, keep)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -response_len:]
    logprobs = selective_log_softmax(logits, targets)
    if not return_entropy:
        return logprobs
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits)
    return logprobs, entropy


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(index) without materialising the full log-softmax tensor twice."""
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropy per position (batch, seq); with a mask, the masked mean over real tokens (scalar)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if mask is None:
        return entropy
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp(min=1)
