"""How a scalar reward model reads and scores answers: the Bradley-Terry preference model's loss and
pair metrics, the (prompt, answer) layout of pairs (`encode_pair`, one layout with
`generation.encode_prompt_answers`), and scoring pairs and single answers with a trained model.

Used by reward training (`reward_training.RewardTrainer`), the reward-model evaluator, evaluation
and the pipeline; none of it needs the training machinery.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from src.models.heads import RewardModel, backbone_of, head_scores
from src.models.precision import autocast
from src.models.prefix import forward_groups

from ..common.pairs import PreferencePair
from .generation import encode_prompt_answers, left_pad


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, labels: Optional[torch.Tensor] = None,
                       margin: float = 0.0) -> torch.Tensor:
    """Mean Bradley-Terry loss. `labels`: P(chosen better) per pair (soft form); None means 1."""
    d = r_chosen.float() - r_rejected.float() - margin
    if labels is None:
        return -F.logsigmoid(d).mean()
    p = labels.to(d)
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def encode_pair(tokenizer, pair: PreferencePair, max_length: int) -> Tuple[List[int], List[int]]:
    """Token ids of (prompt + chosen, prompt + rejected), each ending with end-of-turn, in the one
    reward-model layout (`generation.encode_prompt_answers`): the shared prompt is cut from the left
    so that the longer sequence fits `max_length`, and answers longer than that lose their start."""
    (chosen, rejected), _ = encode_prompt_answers(tokenizer, pair.prompt, [pair.chosen, pair.rejected], max_length)
    return chosen, rejected


def pair_rewards(reward_model: RewardModel, encoded: Sequence[Tuple[List[int], List[int]]],
                 pad_token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rewards of encoded (prompt + chosen, prompt + rejected) pairs, (n,) and (n,), at each sequence's
    last token, from one packed forward in which the tokens a pair's two sequences share (its prompt)
    appear once (src/models/prefix.py, `forward_groups`): the numbers of one forward per sequence up
    to float rounding, gradients included. On the benchmark's hh-rlhf pairs (max length 256) a batch
    of 8 pairs runs about 1,900 tokens with padding instead of 3,400."""
    with autocast(reward_model.device):
        states = forward_groups(backbone_of(reward_model), encoded, pad_token_id)
    rewards = head_scores(reward_model, torch.stack([g[j][-1] for j in (0, 1) for g in states]))  # chosen, then rejected
    return rewards[:len(encoded)], rewards[len(encoded):]


@torch.inference_mode()
def score_pairs(reward_model: RewardModel, tokenizer, pairs: Sequence[PreferencePair], batch_size: int = 16,
                max_length: int = 192, show_progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rewards (chosen, rejected) for every pair, one batched forward per batch of pairs."""
    encoded = [encode_pair(tokenizer, p, max_length) for p in pairs]
    order = sorted(range(len(encoded)), key=lambda i: max(map(len, encoded[i])))
    r_c, r_r = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    was_training = reward_model.training
    reward_model.eval()
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring pairs", disable=not show_progress, leave=False):
        idx = order[start:start + batch_size]
        chosen, rejected = pair_rewards(reward_model, [encoded[i] for i in idx], tokenizer.pad_token_id)
        r_c[idx], r_r[idx] = chosen.float().cpu(), rejected.float().cpu()
    reward_model.train(was_training)
    return r_c, r_r


def reward_scores(reward_model, tokenizer, prompts: Sequence, responses: Sequence[str], batch_size: int = 16,
                  max_length: int = 512) -> List[float]:
    """Reward at the last token of prompt (chat-templated) + answer + end-of-turn, as reward training encodes."""
    encoded = [encode_prompt_answers(tokenizer, prompt, [response], max_length)[0][0]
               for prompt, response in zip(prompts, responses)]
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    out = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start:start + batch_size], tokenizer.pad_token_id)
        out += reward_model(ids.to(device), mask.to(device)).float().cpu().tolist()
    reward_model.train(was_training)
    return out


def pair_metrics(r_c: torch.Tensor, r_r: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 margin: float = 0.0) -> Dict[str, float]:
    """Accuracy counts a pair right when the reward order matches the label's side of 0.5; ties count half."""
    d = r_c - r_r
    target = torch.ones_like(d) if labels is None else labels.to(d)
    sign = torch.where(target >= 0.5, d, -d)
    correct = (sign > 0).float() + 0.5 * (sign == 0).float()
    return {"accuracy": correct.mean().item(), "mean_margin": d.mean().item(),
            "loss": bradley_terry_loss(r_c, r_r, target, margin).item(), "num_pairs": int(d.numel()),
            "reward_mean": torch.cat([r_c, r_r]).mean().item(), "reward_std": torch.cat([r_c, r_r]).std().item()}


def pairwise_accuracy(reward_model: RewardModel, tokenizer, pairs: Sequence[PreferencePair], batch_size: int = 16,
                      max_length: int = 192) -> float:
    r_c, r_r = score_pairs(reward_model, tokenizer, pairs, batch_size, max_length)
    return pair_metrics(r_c, r_r, torch.tensor([p.label for p in pairs]))["accuracy"]
