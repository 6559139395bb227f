"""Bradley-Terry reward model training on preference pairs (human hh-rlhf or AI feedback).

    loss = -log sigmoid(r_chosen - r_rejected - margin)                       hard labels
    loss = -(p * log sigmoid(d) + (1 - p) * log sigmoid(-d)),  d = r_c - r_r - margin   soft labels p

Speed on CPU. A full fine-tune of the 135M backbone over 1,500 pairs takes hours on two cores.
`trainable_layers=N` trains only the top N transformer layers, the final norm and the score head;
embeddings and the layers below stay frozen. Because the frozen bottom never changes, its output is
computed once per example (`cache_frozen_features`, under inference_mode) and every training step
runs only the top N layers on the cached hidden states: the first epoch costs one frozen forward
per example plus the top's forward+backward, later epochs only the top. The price is memory
(hidden_size floats per token: ~0.9 GB for 1,500 pairs at 192 tokens in fp32) and capacity (the
bottom layers cannot adapt). Evaluation runs under inference_mode and reuses the same trick.

Truncation keeps the END of each sequence: the final assistant answer (the thing being judged)
and the last user turn survive; the prompt is cut from the left first, then the answer's start.
Chosen and rejected share one prompt cut, so both answers are judged in the same context.

The step loop, bad-step policy, Ctrl-C, checkpoints and the JSONL log are `training.loop.TrainingLoop`'s.
"""
from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from src.models.attention import attention_for
from src.models.heads import (RewardModel, backbone_of, head_scores, last_token_index, position_ids_from_mask,
                              score_head)
from src.models.precision import autocast
from src.models.prefix import forward_groups

from ..common import distributed as ddp
from ..common import parallel
from ..common.checkpoint import latest_checkpoint
from ..common.io import atomic_dir, atomic_write_json
from ..common.pairs import PreferencePair
from .batching import held_out_indices, length_bucketed_batches
from .guarded_step import clip_and_step, finite_on_all_ranks
from .loop import TrainingLoop, load_models
from .optim import adamw, lr_scheduler
from .reward_scoring import bradley_terry_loss, encode_pair, pair_metrics, pair_rewards

log = logging.getLogger(__name__)

MODEL_NAME = "reward_model"


@dataclass
class RewardTrainerConfig:
    output_dir: str = "outputs/reward_model"
    num_epochs: int = 1
    batch_size: int = 8                       # pairs per step (2x sequences in the forward)
    learning_rate: float = 2e-5               # transformer layers
    head_learning_rate: Optional[float] = None  # score head + final norm; None: same as learning_rate
    weight_decay: float = 0.0
    max_length: int = 192                     # tokens per sequence (prompt + answer), end kept
    margin: float = 0.0                       # required reward gap in the loss
    use_soft_labels: bool = True              # use pair.label as P(chosen better) (hh pairs are 1.0)
    trainable_layers: Optional[int] = None    # None: whole backbone; N: top N layers + norm + head
    cache_frozen_features: bool = True        # with trainable_layers: run the frozen bottom once
    eval_fraction: float = 0.1                # held out from train pairs when no eval set is given
    eval_batch_size: int = 16
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    checkpoint_every: Optional[int] = None    # steps; a final checkpoint is always written
    keep_checkpoints: int = 2
    seed: int = 0
    max_bad_steps: int = 10                   # NaN/inf steps in a row tolerated; one more stops (training/loop.py)
    log_file: Optional[str] = None            # metrics JSONL (a line every log_every steps + evals)
    log_every: int = 10
    show_progress: bool = True
    distributed: str = "auto"                 # auto | ddp | fsdp | none: the data-parallel engine under torchrun (parallel.py)

    def __post_init__(self):
        checks = {
            "num_epochs": self.num_epochs >= 1, "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0, "max_length": self.max_length >= 8,
            "margin": self.margin >= 0, "eval_fraction": 0 <= self.eval_fraction < 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1, "max_grad_norm": self.max_grad_norm > 0,
            "max_bad_steps": self.max_bad_steps >= 0, "eval_batch_size": self.eval_batch_size >= 1,
            "head_learning_rate": self.head_learning_rate is None or self.head_learning_rate > 0,
            "trainable_layers": self.trainable_layers is None or self.trainable_layers >= 0,
            "checkpoint_every": self.checkpoint_every is None or self.checkpoint_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"RewardTrainerConfig.{name} has an invalid value: {getattr(self, name)!r}")
        parallel.check_mode(self.distributed, "RewardTrainerConfig.distributed")


# -- loss and metrics -------------------------------------------------------------------------------


# -- tokenisation --------------------------------------------------------------------------------

def left_pad_states(states: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[(len_i, hidden)] -> (batch, width, hidden) zero-padded on the left, and its mask."""
    width = max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))
    mask = torch.zeros((len(states), width), dtype=torch.long)
    for i, s in enumerate(states):
        out[i, width - s.shape[0]:] = s
        mask[i, width - s.shape[0]:] = 1
    return out, mask


# -- splitting the backbone ---------------------------------------------------------------------

@contextmanager
def _layer_range(backbone: nn.Module, start: int, stop: int, final_norm: bool = True):
    """Run the backbone's own forward over layers[start:stop] only (optionally without its final
    norm), so rotary embeddings, masks and positions come from the HF code itself."""
    layers, norm = backbone.layers, backbone.norm
    backbone.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        backbone.norm = nn.Identity()
    try:
        yield backbone
    finally:
        backbone.layers, backbone.norm = layers, norm


def freeze_bottom(reward_model: RewardModel, trainable_layers: Optional[int]) -> int:
    """requires_grad only on the top `trainable_layers` layers, the final norm and the head.
    Returns the index of the first trainable layer (0 when everything trains)."""
    backbone = backbone_of(reward_model)
    num_layers = len(backbone.layers)
    if trainable_layers is None:
        for p in reward_model.parameters():
            p.requires_grad_(True)
        return 0
    if trainable_layers > num_layers:
        raise ValueError(f"trainable_layers={trainable_layers} but the backbone has only {num_layers} layers")
    first = num_layers - trainable_layers
    for p in reward_model.parameters():
        p.requires_grad_(False)
    for module in [*list(backbone.layers)[first:], backbone.norm, score_head(reward_model)]:
        for p in module.parameters():
            p.requires_grad_(True)
    return first


def rewards_from_ids(reward_model: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return reward_model(input_ids, attention_mask)


def bottom_features(reward_model: RewardModel, encoded: Sequence[Tuple[List[int], List[int]]], pad_token_id: int,
                    first_trainable: int) -> List[List[torch.Tensor]]:
    """Per encoded pair, the (chosen, rejected) hidden states entering layer `first_trainable` (before
    any final norm), each (len, hidden); the prompt the two share runs once (src/models/prefix.py)."""
    backbone = backbone_of(reward_model)
    with _layer_range(backbone, 0, first_trainable, final_norm=False), autocast(reward_model.device):
        return forward_groups(backbone, encoded, pad_token_id)


def rewards_from_features(reward_model: RewardModel, hidden: torch.Tensor, attention_mask: torch.Tensor,
                          first_trainable: int) -> torch.Tensor:
    """Top layers + final norm + head on cached bottom features; reward at the last real token. (batch,)"""
    backbone = backbone_of(reward_model)
    with _layer_range(backbone, first_trainable, len(backbone.layers), final_norm=True), autocast(hidden.device), \
            attention_for(backbone, attention_mask):
        top = backbone(inputs_embeds=hidden, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    scores = head_scores(reward_model, top)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


# -- trainer --------------------------------------------------------------------------------------

class RewardTrainer:
    """Bradley-Terry training of a `RewardModel`: one loop, top to bottom (see module docstring)."""

    def __init__(self, reward_model: RewardModel, tokenizer, config: Optional[RewardTrainerConfig] = None):
        self.model = reward_model
        self.tokenizer = tokenizer
        self.config = config or RewardTrainerConfig()
        self.output_dir = Path(self.config.output_dir)
        self.first_trainable = freeze_bottom(reward_model, self.config.trainable_layers)
        ddp.init_distributed()  # joins torchrun's process group; a no-op in a plain process
        ddp.broadcast_model(reward_model)  # under torchrun every rank starts from rank 0's weights
        self.use_cache = self.config.trainable_layers is not None and self.config.cache_frozen_features
        self.loop: Optional[TrainingLoop] = None  # one per train() call
        self.history: List[dict] = []             # every step's metrics and every evaluation
        self._features: Dict[int, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        self.parallel: Optional[parallel.Parallel] = None  # DDP / FSDP / as is: wrapped in train()

    def _run(self, fn):
        """fn(model), inside the DDP/FSDP engine when there is one (every forward must be, under FSDP)."""
        return self.parallel(fn) if self.parallel is not None else fn(self.model)

    # .. data ......................................................................................
    def _encode(self, pairs: Sequence[PreferencePair]):
        return [encode_pair(self.tokenizer, p, self.config.max_length) for p in pairs]

    def _cached_features(self, key: int, encoded, desc: str):
        """Frozen-bottom hidden states per sequence, computed once (inference_mode, batched by length)."""
        if key in self._features:
            return self._features[key]
        out: List[Optional[List[torch.Tensor]]] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: max(map(len, encoded[i])))
        bs = max(1, self.config.eval_batch_size // 2)  # pairs per forward: eval_batch_size sequences
        self.model.eval()
        starts = range(0, len(order), bs)
        with torch.inference_mode():
            for start in tqdm(starts, desc=desc, disable=not self.config.show_progress, leave=False):
                idx = order[start:start + bs]
                states = self._run(lambda m: bottom_features(m, [encoded[i] for i in idx], self.tokenizer.pad_token_id,
                                                             self.first_trainable))
                for i, pair in zip(idx, states):
                    out[i] = pair
        # clone() outside inference_mode: autograd may save these inputs for the backward pass.
        self._features[key] = ([c.clone() for c, _ in out], [r.clone() for _, r in out])
        return self._features[key]

    def _batch_rewards(self, encoded, idx, features=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected in ONE forward (concatenated along the batch). (n,), (n,)"""
        device = self.model.device
        n = len(idx)
        if features is not None:
            states = [features[0][i] for i in idx] + [features[1][i] for i in idx]
            hidden, mask = left_pad_states(states)
            rewards = self._run(lambda m: rewards_from_features(m, hidden.to(device), mask.to(device),
                                                                self.first_trainable))
        else:  # the prompt the two share runs once (reward_scoring.pair_rewards)
            return self._run(lambda m: pair_rewards(m, [encoded[i] for i in idx], self.tokenizer.pad_token_id))
        return rewards[:n], rewards[n:]

    def _labels(self, pairs, idx) -> Optional[torch.Tensor]:
        if not self.config.use_soft_labels:
            return None
        return torch.tensor([pairs[i].label for i in idx], dtype=torch.float32, device=self.model.device)

    # .. optimisation ..............................................................................
    def _optimizer(self, total_steps: int):
        head_params = {id(p) for m in (score_head(self.model), backbone_of(self.model).norm) for p in m.parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        body = [p for p in trainable if id(p) not in head_params]
        head = [p for p in trainable if id(p) in head_params]
        head_lr = self.config.head_learning_rate or self.config.learning_rate
        groups = [g for g in ({"params": body, "lr": self.config.learning_rate},
                              {"params": head, "lr": head_lr}) if g["params"]]
        optimizer = adamw(groups, weight_decay=self.config.weight_decay)
        # linear warm-up, then linear decay to 10% (optim.lr_factor, shared by every trainer)
        warmup = int(self.config.warmup_ratio * total_steps)
        return optimizer, lr_scheduler(optimizer, "linear", warmup, total_steps, min_ratio=0.1)

    @property
    def global_step(self) -> int:
        return self.loop.step if self.loop else 0

    @property
    def bad_steps(self) -> int:
        """Steps skipped as non-finite in this run (all of them, not only the last ones in a row)."""
        return self.loop.skipped_updates if self.loop else 0

    # .. main loop .................................................................................
    def train(self, train_pairs: Sequence[PreferencePair], eval_pairs: Optional[Sequence[PreferencePair]] = None,
              resume_from=None) -> Dict[str, float]:
        cfg = self.config
        train_pairs = list(train_pairs)
        if not train_pairs:
            raise ValueError("no training pairs: give at least one preference pair")
        if eval_pairs is None and cfg.eval_fraction > 0 and len(train_pairs) >= 10:
            train_idx, eval_idx = held_out_indices(len(train_pairs), cfg.eval_fraction, random.Random(cfg.seed),
                                                   rounding=int)
            eval_pairs, train_pairs = [train_pairs[i] for i in eval_idx], [train_pairs[i] for i in train_idx]
        eval_pairs = list(eval_pairs or [])

        started = time.time()
        self._features.clear()  # features belong to this call's pairs
        encoded = self._encode(train_pairs)
        eval_encoded = self._encode(eval_pairs) if eval_pairs else []
        lengths = [max(len(c), len(r)) for c, r in encoded]
        steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.num_epochs
        if self.parallel is None:  # DDP / FSDP2 / as is; before the optimiser (FSDP shards the parameters)
            self.parallel = parallel.wrap(self.model, cfg.distributed)
        optimizer, scheduler = self._optimizer(total_steps)
        loop = self.loop = TrainingLoop(
            "reward model", cfg.max_bad_steps, keep_last=cfg.keep_checkpoints, log_file=cfg.log_file,
            log_every=cfg.log_every,
            advice="Lower the learning rate, check the pairs for empty answers, or train in float32.")
        loop.schedulers = [scheduler]
        if resume_from is not None and latest_checkpoint(resume_from) is not None:
            loaded = loop.resume(resume_from)
            load_models(loaded, {MODEL_NAME: self.model}, {MODEL_NAME: optimizer})
            if "optimizer" in loaded.trainer_state:  # else it came with the sharded model (DCP)
                optimizer.load_state_dict(loaded.trainer_state["optimizer"])
            scheduler.load_state_dict(loaded.trainer_state["scheduler"])

        features = self._cached_features(0, encoded, "caching frozen layers (train)") if self.use_cache else None
        eval_features = (self._cached_features(1, eval_encoded, "caching frozen layers (eval)")
                         if self.use_cache and eval_pairs else None)

        first_step = loop.step
        batches: List[List[int]] = []
        epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}  # running means over the epoch, for the log
        seen: Dict[int, Tuple[float, float]] = {}  # this epoch's training rewards, pair index -> (r_c, r_r)
        last_eval: Optional[Dict[str, float]] = None  # metrics of the eval set after the last epoch

        def step() -> dict:
            nonlocal last_eval
            epoch, position = divmod(loop.step, steps_per_epoch)
            if position == 0 or loop.step == first_step:  # a new epoch (or the resumed one)
                # the order depends only on (seed, epoch), so a resumed run replays the same batches
                batches[:] = length_bucketed_batches(lengths, cfg.batch_size, random.Random(cfg.seed * 1000 + epoch),
                                                     chunk_batches=50)
                seen.clear()
                epoch_sums.update(loss=0.0, accuracy=0.0, steps=0)
                self.model.train()
            lr = optimizer.param_groups[0]["lr"]
            out = self._train_step(train_pairs, encoded, batches[position], features, optimizer)
            seen.update(out["rewards"])
            for key in ("loss", "accuracy"):
                epoch_sums[key] += out[key]
            epoch_sums["steps"] += 1
            record = {"step": loop.step + 1, "epoch": epoch, "loss": epoch_sums["loss"] / epoch_sums["steps"],
                      "accuracy": epoch_sums["accuracy"] / epoch_sums["steps"], "lr": lr,
                      "elapsed_s": round(time.time() - started, 1)}
            loop.end_step(record, out["skipped"])
            record["bad_steps"] = loop.skipped_updates
            self.history.append(record)
            if position == steps_per_epoch - 1 and eval_pairs:  # the end of an epoch
                metrics = last_eval = self._evaluate_encoded(eval_pairs, eval_encoded, eval_features)
                evaluation = {"step": loop.step, "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
                self.history.append(evaluation)
                loop.log({"event": "eval", **evaluation})
                log.info("epoch %d eval: accuracy %.3f margin %.3f", epoch + 1, metrics["accuracy"],
                         metrics["mean_margin"])
            return record

        # the last step's checkpoint is written below, with the reward statistics
        loop.run(step, total_steps, lambda: self.save_checkpoint(optimizer, scheduler),
                 checkpoint_every=cfg.checkpoint_every or 0, save_last=False,
                 show={"loss": "loss", "acc": "accuracy"}, show_progress=cfg.show_progress)

        # Normalisation statistics for PPO: rewards over chosen + rejected of the reference set. No
        # extra forward pass where one was already made: the eval set was just scored with the final
        # weights; without an eval set, the last epoch's own training rewards (detached, each pair
        # scored once, by weights at most one epoch old) stand in. A pass over the training pairs
        # would cost another third of a one-epoch run. Only when the last epoch did not score every
        # pair on this rank (resumed at its end, skipped steps, several ranks) is the pass made.
        if last_eval is not None:
            final = last_eval
        elif eval_pairs:
            final = self._evaluate_encoded(eval_pairs, eval_encoded, eval_features)
        elif len(seen) == len(train_pairs):
            r_c, r_r = (torch.tensor([seen[i][k] for i in range(len(train_pairs))]) for k in (0, 1))
            final = pair_metrics(r_c, r_r, torch.tensor([p.label for p in train_pairs]), cfg.margin)
        else:
            final = self._evaluate_encoded(train_pairs, encoded, features)
        self.model.set_reward_stats(final["reward_mean"], final["reward_std"])
        self.model.config.reward_max_length = cfg.max_length  # evaluate/score with the trained context
        self.save_checkpoint(optimizer, scheduler)
        if self.parallel.mode == "fsdp":  # a plain model again (full weights on every rank)
            self.model = self.parallel.unwrap()
            self.parallel = None
        if ddp.is_main_process():
            self.save_final()
        summary = {"steps": loop.step, "bad_steps": loop.skipped_updates, "train_pairs": len(train_pairs),
                   "eval_pairs": len(eval_pairs), "elapsed_s": round(time.time() - started, 1),
                   **{f"eval_{k}": v for k, v in final.items()}}
        if ddp.is_main_process():
            atomic_write_json(self.output_dir / "train_summary.json", {"summary": summary, "config": asdict(cfg)})
        ddp.barrier()
        return summary

    def _train_step(self, pairs, encoded, idx: List[int], features, optimizer) -> dict:
        """One optimiser step on pairs[idx]: {"loss", "accuracy" (of the whole batch), "skipped" (0 or 1),
        "rewards": {pair index: (r_chosen, r_rejected)} this rank scored}."""
        cfg = self.config
        # Under torchrun each rank scores its share of the batch; scaling the share's mean loss by
        # share * ranks / batch makes the ranks' mean gradient the whole batch's.
        local = ddp.shard(idx)
        # Fewer pairs than ranks: this rank adds zero gradient. Under DDP/FSDP it must still run the
        # forward and backward (they hold collectives): one pair, weighted 0.
        rows = local or (idx[:1] if self.parallel.wrapped else [])
        optimizer.zero_grad(set_to_none=True)
        if rows:
            r_c, r_r = self._batch_rewards(encoded, rows, features)
            loss = bradley_terry_loss(r_c, r_r, self._labels(pairs, rows), cfg.margin)
            if ddp.world_size() > 1:
                loss = loss * (len(local) * ddp.world_size() / len(idx))
            if not local:
                r_c = r_r = torch.zeros(0)
        else:  # fewer pairs than ranks: this rank contributes zero gradients
            r_c = r_r = torch.zeros(0)
            loss = torch.zeros(())
        ok = finite_on_all_ranks(loss)  # all ranks skip together or none does
        if ok:
            if rows:
                loss.backward()
            _, ok = clip_and_step([(self.model, optimizer, cfg.max_grad_norm)])
        if not ok:
            optimizer.zero_grad(set_to_none=True)
        accuracy = ddp.all_reduce_mean(((r_c - r_r) > 0).float().mean().item() if local else 0.0)
        rewards = {}
        if local and ok:
            rewards = dict(zip(local, zip(r_c.detach().float().tolist(), r_r.detach().float().tolist())))
        return {"loss": ddp.all_reduce_mean(loss.item()) if ok else 0.0, "accuracy": accuracy,
                "skipped": int(not ok), "rewards": rewards}

    @torch.inference_mode()
    def _evaluate_encoded(self, pairs, encoded, features=None) -> Dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        r_c, r_r = torch.zeros(len(pairs)), torch.zeros(len(pairs))
        order = sorted(range(len(encoded)), key=lambda i: max(map(len, encoded[i])))
        bs = self.config.eval_batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            c, r = self._batch_rewards(encoded, idx, features)
            r_c[idx], r_r[idx] = c.float().cpu(), r.float().cpu()
        self.model.train(was_training)
        return pair_metrics(r_c, r_r, torch.tensor([p.label for p in pairs]), self.config.margin)

    def evaluate(self, pairs: Sequence[PreferencePair]) -> Dict[str, float]:
        """Pairwise accuracy, mean reward margin, loss and reward mean/std on `pairs` (inference_mode)."""
        pairs = list(pairs)
        return self._evaluate_encoded(pairs, self._encode(pairs))

    # .. persistence ...............................................................................
    def save_checkpoint(self, optimizer, scheduler) -> Path:
        state = {"scheduler": scheduler.state_dict()}
        if not parallel.is_sharded(self.model):  # FSDP: the optimiser goes with the model's shards (DCP)
            state["optimizer"] = optimizer.state_dict()
        return self.loop.save(self.output_dir / "checkpoints", {MODEL_NAME: self.model}, self.tokenizer, state,
                              metadata={"stage": "reward_model", "config": asdict(self.config)},
                              optimizers={MODEL_NAME: optimizer})

    def save_final(self) -> Path:
        """The trained model as a plain HF directory (with tokenizer and reward stats), written atomically."""
        target = self.output_dir / MODEL_NAME
        with atomic_dir(target) as tmp:
            self.model.save_pretrained(tmp, tokenizer=self.tokenizer)
        return target
