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
  gradient checkpointing works (no cache). SFT packs its examples with the same mask
  (`block_causal_mask`).

Both give the numbers of one forward per full sequence, up to float rounding (tested).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .attention import attention_for

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

    device = next(backbone.parameters()).device
    lens = [len(r) for r in rows]
    width_rows = max(lens)
    ids = torch.full((len(rows), width_rows), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width_rows), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
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
    mask, ids = block_causal_mask(owner, branch).to(device), ids.to(device)
    with attention_for(backbone, ids):  # eager attention for short rows on CPU (src/models/attention.py)
        hidden = backbone(input_ids=ids, attention_mask=mask,
                          position_ids=positions.to(device), use_cache=False).last_hidden_state
    out: List[List[torch.Tensor]] = [[] for _ in groups]
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
    """The additive attention mask (rows, 1, width, width) of packed rows: `owner` (rows, width) says
    which item each column holds (-1: padding). Query q sees key t when both belong to one item and t
    is not after q; with `branch`, also only when t is in the item's shared part (-1) or in q's own
    branch. Passed as `attention_mask`, Hugging Face models use a 4-D mask as it is."""
    visible = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
    if branch is not None:
        visible &= (branch[:, None, :] == -1) | (branch[:, :, None] == branch[:, None, :])
    visible &= torch.ones(owner.shape[1], owner.shape[1], dtype=torch.bool, device=owner.device).tril()
    return torch.zeros(visible.shape, dtype=torch.float32, device=owner.device) \
        .masked_fill_(~visible, torch.finfo(torch.float32).min)[:, None]


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `sequences` share, leaving each at least its last token (where a
    reward or a value is read)."""
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n
