"""Shared prefixes and packed rows: a prefix that several sequences share runs once, and short
sequences share rows instead of padding.

A causal model's states for a prompt do not depend on what follows it. When sequences share a
prompt (the two answers of a preference pair, several judged answers to one prompt, the chat
template's system turn), the prompt need run only once:

- `forward_after_prefix`: the prompt runs with a key/value cache and each continuation runs after
  its prompt's cached keys and values (rows right-padded; prefixes left-padded and masked; positions
  continued). The judge backbone uses it (`judging/evaluators/harm_judge.py`, inference, many
  answers per prompt, chunked).
- `forward_groups`: one forward over packed rows: a group's shared tokens once, then each sequence's
  rest beside them, a block attention mask letting each rest see the shared part and itself only;
  several groups per row (`pack_rows`), so there is little padding either. Reward-model training and
  scoring use it (`training/reward_scoring.py`); gradients flow as in one forward per sequence, and
  gradient checkpointing works (no cache). (SFT, whose examples share nothing, goes padding-free
  instead: `attention.packed_attention`.)

Both give the numbers of one forward per full sequence, up to float rounding (tested).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .attention import attention_for, takes_4d_masks

PerLayerKV = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (heads, length, head dim)


def forward_after_prefix(backbone: nn.Module, rows: Sequence[List[int]], pad_token_id: int,
                         past: Optional[Sequence[Optional[PerLayerKV]]] = None, keep_cache: bool = False,
                         hidden_layers: Optional[Sequence[int]] = None
                         ) -> Tuple[List[torch.Tensor], Optional[List[PerLayerKV]]]:
    """Run `rows` (token ids) through a decoder `backbone`, each after its cached prefix (`past`: per row
    None or that prefix's per-layer keys/values, as an earlier call returned them).

    Returns per row its hidden states, (len, hidden): the backbone's last hidden state, or with
    `hidden_layers` the outputs of those layers concatenated (`hidden_states[l]`); and with
    `keep_cache` per row the per-layer keys/values of prefix + row, to be a later call's `past`
    (else None). Autograd flows through all of it.
    """
    from transformers import DynamicCache

    from src.safety.constitutional.training.generation import right_pad  # here: generation imports src.models

    device = next(backbone.parameters()).device
    lens = [len(r) for r in rows]
    ids, mask = right_pad(rows, pad_token_id, device)
    width_rows = ids.shape[1]
    past = list(past) if past is not None else [None] * len(rows)
    past_lens = [0 if p is None else p[0][0].shape[1] for p in past]
    width = max(past_lens)
    cache = DynamicCache() if keep_cache else None
    if width:
        some = next(p for p in past if p is not None)
        layers = []
        for layer, (k0, _) in enumerate(some):
            blank = k0.new_zeros(k0.shape[0], 0, k0.shape[2])
            padded = [[F.pad(blank if p is None else p[layer][j], (0, 0, width - n, 0)) for p, n in zip(past, past_lens)]
                      for j in (0, 1)]
            layers.append((torch.stack(padded[0]), torch.stack(padded[1])))
        cache = DynamicCache(ddp_cache_data=layers)
    offsets = torch.tensor(past_lens, device=device)
    past_mask = (torch.arange(width, device=device)[None, :] >= (width - offsets)[:, None]).long()
    out = backbone(input_ids=ids, attention_mask=torch.cat([past_mask, mask], dim=1),
                   position_ids=offsets[:, None] + torch.arange(width_rows, device=device)[None, :],
                   past_key_values=cache, use_cache=keep_cache, output_hidden_states=hidden_layers is not None)
    hidden = (out.last_hidden_state if hidden_layers is None
              else torch.cat([out.hidden_states[l] for l in hidden_layers], dim=-1))
    states = [hidden[i, :lens[i]] for i in range(len(rows))]
    if not keep_cache:
        return states, None
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    # row i's prefix sits just left of column `width` and its own tokens just right of it
    return states, [[(k[i, :, width - past_lens[i]:width + lens[i]], v[i, :, width - past_lens[i]:width + lens[i]])
                     for k, v in kv] for i in range(len(rows))]


def forward_groups(backbone: nn.Module, groups: Sequence[Sequence[List[int]]], pad_token_id: int
                   ) -> List[List[torch.Tensor]]:
    """Per group of sequences (the two answers of a preference pair, with their prompt), each sequence's
    hidden states (len, hidden), as one forward per sequence gives them, from ONE forward with no
    token repeated: a group's shared leading tokens (`shared_prefix_length`) then the rest of each of
    its sequences sit side by side in a row, each rest seeing the shared tokens and itself only (a
    block attention mask) and its positions continuing from the shared part; groups are packed
    several to a row (first fit, rows no longer than the longest group), so there is little padding.
    Run it inside the caller's autocast."""
    device = next(backbone.parameters()).device
    if not takes_4d_masks(backbone):  # e.g. flash-attention 2: one right-padded row per sequence
        from src.safety.constitutional.training.generation import right_pad

        seqs = [(i, seq) for i, g in enumerate(groups) for seq in g]
        ids, mask = right_pad([seq for _, seq in seqs], pad_token_id, device)
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        out: List[List[torch.Tensor]] = [[] for _ in groups]
        for row, (i, seq) in enumerate(seqs):
            out[i].append(hidden[row, :len(seq)])
        return out
    cuts = [shared_prefix_length(g) for g in groups]
    sizes = [k + sum(len(s) - k for s in g) for g, k in zip(groups, cuts)]
    width = max(sizes)
    rows = pack_rows(sizes)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)   # each column's group; -1: padding
    branch = torch.full((len(rows), width), -1, dtype=torch.long)  # which sequence's rest; -1: the shared part
    spans = {}  # (group, sequence) -> (row, shared part's start, its length, rest's start, rest's end)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            g, k = groups[i], cuts[i]
            ids[r, at:at + k] = torch.as_tensor(g[0][:k], dtype=torch.long)
            positions[r, at:at + k] = torch.arange(k)
            owner[r, at:at + k] = i
            shared_at, at = at, at + k
            for j, seq in enumerate(g):
                end = at + len(seq) - k
                ids[r, at:end] = torch.as_tensor(seq[k:], dtype=torch.long)
                positions[r, at:end] = torch.arange(k, len(seq))
                owner[r, at:end], branch[r, at:end] = i, j
                spans[i, j] = (r, shared_at, k, at, end)
                at = end
    ids = ids.to(device)
    with attention_for(backbone, ids) as kernel:  # eager attention for short rows on CPU (src/models/attention.py)
        mask = attention_mask_for(block_causal_mask(owner, branch).to(device), kernel)
        hidden = backbone(input_ids=ids, attention_mask=mask,
                          position_ids=positions.to(device), use_cache=False).last_hidden_state
    out = [[] for _ in groups]
    for (i, j), (r, shared_at, k, start, end) in sorted(spans.items()):
        out[i].append(torch.cat([hidden[r, shared_at:shared_at + k], hidden[r, start:end]]))
    return out


def pack_rows(sizes: Sequence[int]) -> List[List[int]]:
    """Item indices per row: first fit, longest first, into rows as long as the longest item."""
    width = max(sizes)
    rows: List[List[int]] = []
    free: List[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = next((r for r, room in enumerate(free) if room >= sizes[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= sizes[i]
    return rows


def block_causal_mask(owner: torch.Tensor, branch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which keys each query sees in packed rows, (rows, 1, width, width) bool: `owner` (rows, width)
    says which item each column holds (-1: padding). Query q sees key t when both belong to one item
    and t is not after q; with `branch`, also only when t is in the item's shared part (-1) or in q's
    own branch. A padding column sees itself only, so no row of the mask is empty (an empty row gives
    NaN in SDPA, and NaN gradients). Convert with `attention_mask_for` inside the kernel's context."""
    visible = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
    if branch is not None:
        visible &= (branch[:, None, :] == -1) | (branch[:, :, None] == branch[:, None, :])
    visible &= torch.ones(owner.shape[1], owner.shape[1], dtype=torch.bool, device=owner.device).tril()
    visible |= torch.eye(owner.shape[1], dtype=torch.bool, device=owner.device) & (owner < 0)[:, :, None]
    return visible[:, None]


def attention_mask_for(mask: torch.Tensor, implementation: Optional[str]) -> torch.Tensor:
    """A 4-D bool mask (True: visible) as the attention kernel takes it: Hugging Face passes a 4-D mask
    through unchanged, SDPA reads bool, eager attention adds it to the scores (0 or the float minimum).
    Other masks are returned as they are."""
    if mask.dim() != 4 or mask.dtype != torch.bool or implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `sequences` share, leaving each at least its last token (where a
    reward or a value is read)."""
    return min(len(os.path.commonprefix([list(s) for s in sequences])), min(len(s) for s in sequences) - 1)
