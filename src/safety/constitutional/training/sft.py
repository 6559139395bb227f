"""Supervised fine-tuning on (prompt, answer) pairs: the critique-revision stage's training step.

The loss is the causal-LM loss on the answer tokens only. Each example is tokenised exactly the way
`generation.generate` sees it at inference time: the chat-template prompt (`render_prompt`, ending
with the assistant header) followed by the answer and the end-of-turn token, so the model learns to
stop where generation stops.

    tokens:  <prompt ......................><answer ........><eot>  <pad ...>
    labels:  -100 ......................... answer ids ...... eot   -100 ...

Batches are length-bucketed (shuffle, cut into chunks of `bucket_batches` batches, sort each chunk
by length) and padded per batch, so little compute goes to padding. The data order of every epoch
is a pure function of (seed, epoch), and the checkpoint stores the epoch and position within it,
so a resumed run sees exactly the batches the uninterrupted run would have seen. The step loop,
bad-step policy, Ctrl-C, checkpoints and the JSONL log are `training.loop.TrainingLoop`'s.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from src.models.attention import can_pack
from src.models.checkpointing import enable_gradient_checkpointing
from src.models.lora import add_lora

from ..common import distributed as ddp
from ..common import parallel
from .batching import held_out_indices, length_bucketed_batches
from .generation import render_prompt
from .guarded_step import clip_and_step
from .logprobs import lm_logits
from .loop import TrainingLoop, load_models
from .optim import LR_SCHEDULES, adamw, lr_scheduler

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MODEL_NAME = "policy"  # sub-folder of each checkpoint holding the fine-tuned model


@dataclass
class SFTConfig:
    """Supervised fine-tuning settings (one optimiser step = `batch_size * grad_accum_steps` examples)."""

    output_dir: str = "runs/sft"
    num_epochs: int = 2
    batch_size: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 5e-5       # 135M model, a few dozen examples: 1e-5 barely moves it in 2 epochs
    lr_schedule: str = "cosine"       # after warm-up: "cosine" or "linear" decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0        # <= 0 disables clipping (the norm is still measured)
    max_seq_len: int = 512
    eval_fraction: float = 0.1        # held out of train_records when no eval_records are given
    eval_batch_size: int = 16
    bucket_batches: int = 8           # length-sort within shuffled chunks of this many batches
    packing: bool = True              # padding-free batches: examples back to back in one row, attention
                                      # within each (off under gradient checkpointing; see collate)
    checkpoint_every: int = 0         # optimiser steps; 0 = only the final checkpoint
    keep_last: int = 2
    seed: int = 0
    max_bad_steps: int = 10           # NaN/inf steps in a row tolerated; one more stops (training/loop.py)
    log_file: Optional[str] = None    # JSONL metrics log (appended)
    gradient_checkpointing: bool = False
    lora_r: int = 0                   # LoRA rank (0: full fine-tuning); src/models/lora.py, merge_lora to export
    lora_alpha: float = 16.0
    system_prompt: Optional[str] = None  # passed to render_prompt; must match what generation uses
    show_progress: bool = True
    distributed: str = "auto"         # auto | ddp | fsdp | none: the data-parallel engine under torchrun (parallel.py)

    def __post_init__(self):
        positive = ("num_epochs", "batch_size", "grad_accum_steps", "max_seq_len", "eval_batch_size",
                    "bucket_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"SFTConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.lora_r < 0:
            raise ValueError(f"SFTConfig.lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"SFTConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"SFTConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"SFTConfig.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"SFTConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.checkpoint_every < 0 or self.max_bad_steps < 0:
            raise ValueError("SFTConfig.checkpoint_every and max_bad_steps must be >= 0")
        self.adam_betas = tuple(self.adam_betas)
        parallel.check_mode(self.distributed, "SFTConfig.distributed")


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------

@dataclass
class SFTExample:
    input_ids: List[int]
    labels: List[int]   # IGNORE_INDEX over the prompt, token ids over answer + end-of-turn

    def __len__(self) -> int:
        return len(self.input_ids)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn; `generate` stops on it (it is the tokenizer's eos)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: SFT cannot teach the model where answers end")
    return int(tokenizer.eos_token_id)


def tokenize_example(tokenizer, prompt, response: str, max_seq_len: int,
                     system_prompt: Optional[str] = None) -> tuple[SFTExample, bool]:
    """(example, truncated). Prompt and answer are tokenised separately, as at generation time:
    the prompt alone is what `generate` encodes, and the answer tokens are what it would emit."""
    if not isinstance(response, str):
        raise TypeError(f"an SFT response must be a string, got {type(response).__name__}")
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(response.strip(), add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    truncated = len(prompt_ids) + len(answer_ids) > max_seq_len
    if truncated:
        # Keep the whole answer if it fits beside half a prompt, else cut the answer's end (its
        # end-of-turn is lost then); the prompt loses its start, as `generate` truncates it.
        answer_room = max(max_seq_len - min(len(prompt_ids), max_seq_len // 2), 1)
        answer_ids = answer_ids[:answer_room]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_seq_len - len(answer_ids)):] \
            if max_seq_len > len(answer_ids) else []
    return SFTExample(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids), truncated


def tokenize_records(tokenizer, records: Sequence[dict], max_seq_len: int,
                     system_prompt: Optional[str] = None) -> List[SFTExample]:
    examples, n_truncated = [], 0
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "prompt" not in record or "response" not in record:
            raise ValueError(f"SFT record {number} must be a dict with 'prompt' and 'response', got {record!r:.80}")
        example, truncated = tokenize_example(tokenizer, record["prompt"], record["response"], max_seq_len,
                                              system_prompt)
        n_truncated += truncated
        examples.append(example)
    if n_truncated:
        warnings.warn(f"{n_truncated} of {len(records)} SFT examples were longer than max_seq_len={max_seq_len} "
                      "tokens and were truncated")
    return examples


def collate(examples: Sequence[SFTExample], pad_token_id: int, pack: bool = False) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example in this batch (dynamic padding). All (batch, seq).

    `pack`: all examples in ONE row with no padding (padding-free), each example's `position_ids`
    starting at 0 and `cu_seq_lens` (cumulative lengths) telling attention where each ends
    (`src/models/attention.py`, `packed_attention`): the same loss with no compute spent on padding.
    Each example's first label is ignored (it would be predicted from the previous example's last
    token; a first token is a prompt token, so this loses nothing)."""
    if not pack:
        width = max(len(e) for e in examples)
        input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e)
            input_ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    labels = [e.labels for e in examples]
    return {"input_ids": torch.tensor([[t for e in examples for t in e.input_ids]]),
            "labels": torch.tensor([[t for row in labels for t in [IGNORE_INDEX] + list(row[1:])]]),
            "position_ids": torch.cat([torch.arange(len(e)) for e in examples])[None],
            "cu_seq_lens": torch.tensor([0] + [len(e) for e in examples]).cumsum(0).to(torch.int32)}


def split_eval(records: Sequence[dict], fraction: float, seed: int):
    """(train, eval): a seeded random `fraction` held out (at least one record if fraction > 0), both
    in the records' order."""
    train, held = held_out_indices(len(records), fraction, random.Random(f"sft-eval-split:{seed}"))
    return [records[i] for i in sorted(train)], [records[i] for i in sorted(held)]


def _fingerprint(examples: Sequence[SFTExample]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------

class SFTTrainer:
    """`SFTTrainer(model, tokenizer, config).train(train_records, eval_records)` -> metrics dict.

    Records are `{"prompt": str | chat messages, "response": str}`; extra keys are ignored.
    The model is trained in place; the final weights are also written as a checkpoint under
    `config.output_dir` (`checkpoint-<step>/policy/`, a plain Hugging Face directory with the tokenizer).
    """

    def __init__(self, model, tokenizer, config: Optional[SFTConfig] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or SFTConfig()
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; use src.models.loading.prepare_tokenizer")
        self.device = next(model.parameters()).device
        ddp.init_distributed()  # joins torchrun's process group; a no-op in a plain process
        ddp.broadcast_model(model)  # under torchrun every rank starts from rank 0's weights
        if self.config.lora_r:  # only the adapters train; `merge_lora(model)` folds them in for export
            add_lora(model, self.config.lora_r, self.config.lora_alpha)
        self.parallel: Optional[parallel.Parallel] = None  # DDP / FSDP / as is: wrapped in train()

    # -- losses ------------------------------------------------------------------------------------
    def _pack(self) -> bool:
        """Padding-free batches (collate's `pack`) where the model's attention can take them."""
        return self.config.packing and can_pack(self.model)

    def _token_losses(self, batch: Dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of answer-token losses, number of answer tokens) for one padded batch."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        targets = batch["labels"][:, 1:]                     # token t is predicted at position t-1
        keep = targets != IGNORE_INDEX                       # (batch, seq-1) answer positions
        # The 49k-vocabulary LM head costs as much as the backbone here: run it on answer positions only
        # (prompt positions are masked out of the loss anyway).
        positions = torch.cat([keep, torch.zeros_like(keep[:, :1])], 1)  # logits at t predict token t+1

        def loss_of(model):  # run inside the DDP/FSDP engine when there is one (parallel.py)
            logits = lm_logits(model, batch["input_ids"], batch.get("attention_mask"), positions,  # (answer_tokens, vocab)
                               position_ids=batch.get("position_ids"), cu_seq_lens=batch.get("cu_seq_lens"))
            return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")

        loss = self.parallel(loss_of) if self.parallel is not None else loss_of(self.model)
        return loss, int(keep.sum())

    @torch.no_grad()
    def evaluate(self, examples: Sequence[SFTExample]) -> Optional[float]:
        """Mean answer-token loss over `examples` (None if there are none)."""
        if not examples:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
        bs = self.config.eval_batch_size
        for start in range(0, len(order), bs):
            batch = collate([examples[i] for i in order[start:start + bs]], self.tokenizer.pad_token_id,
                            self._pack())
            loss, n = self._token_losses(batch)
            total, count = total + float(loss), count + n
        if was_training:
            self.model.train()
        return total / max(count, 1)

    # -- training ----------------------------------------------------------------------------------
    def train(self, train_records: Sequence[dict], eval_records: Optional[Sequence[dict]] = None,
              resume_from=None) -> dict:
        cfg = self.config
        train_records = list(train_records)
        if not train_records:
            raise ValueError("no SFT training records: give at least one {'prompt', 'response'} record")
        if eval_records is None:
            train_records, eval_records = split_eval(train_records, cfg.eval_fraction, cfg.seed)
        train_ex = tokenize_records(self.tokenizer, train_records, cfg.max_seq_len, cfg.system_prompt)
        eval_ex = tokenize_records(self.tokenizer, list(eval_records), cfg.max_seq_len, cfg.system_prompt)
        lengths = [len(e) for e in train_ex]
        fingerprint = _fingerprint(train_ex)

        n_batches = math.ceil(len(train_ex) / cfg.batch_size)
        steps_per_epoch = math.ceil(n_batches / cfg.grad_accum_steps)
        total_steps = steps_per_epoch * cfg.num_epochs
        warmup_steps = int(round(cfg.warmup_ratio * total_steps))

        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.parallel is None:  # DDP / FSDP2 / as is; before the optimiser (FSDP shards the parameters)
            self.parallel = parallel.wrap(self.model, cfg.distributed, self.device)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        optimizer = adamw(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=cfg.adam_betas)
        scheduler = lr_scheduler(optimizer, cfg.lr_schedule, warmup_steps, total_steps, cfg.min_lr_ratio)

        loop = self.loop = TrainingLoop(
            "sft", cfg.max_bad_steps, keep_last=cfg.keep_last, log_file=cfg.log_file,
            advice="Lower learning_rate, train in float32, or look for broken records.")
        loop.schedulers = [scheduler]  # also stepped after a skipped step: the schedule follows the data position
        state = {"step": 0, "train_loss": [], "eval_loss": [], "eval_loss_before": None, "tokens_seen": 0}
        if resume_from is not None:
            self._resume(resume_from, optimizer, scheduler, fingerprint, state)
        else:
            state["eval_loss_before"] = self.evaluate(eval_ex)
            if state["eval_loss_before"] is not None:
                loop.log({"event": "eval", "step": 0, "eval_loss": state["eval_loss_before"]})

        def step() -> dict:
            state["step"] = loop.step
            epoch, step_in_epoch = divmod(loop.step, steps_per_epoch)
            batches = length_bucketed_batches(lengths, cfg.batch_size, random.Random(f"sft-data-order:{cfg.seed}:{epoch}"),
                                              cfg.bucket_batches, longest_first=True)
            group = batches[step_in_epoch * cfg.grad_accum_steps:(step_in_epoch + 1) * cfg.grad_accum_steps]
            record = self._train_step(group, train_ex, optimizer, state)
            record.update(step=loop.step + 1, epoch=epoch + (step_in_epoch + 1) / steps_per_epoch)
            return loop.end_step(record, int(record["skipped"]))

        start_time = time.time()
        self.model.train()
        save = lambda: self._save(optimizer, scheduler, fingerprint, state)  # noqa: E731
        # the last step's checkpoint is written below, after the final evaluation
        loop.run(step, total_steps, save, checkpoint_every=cfg.checkpoint_every, save_last=False,
                 show={"loss": "loss", "lr": "lr"}, show_progress=cfg.show_progress)
        state["step"] = loop.step

        eval_after = self.evaluate(eval_ex)
        if eval_after is not None:
            state["eval_loss"].append([loop.step, eval_after])
            loop.log({"event": "eval", "step": loop.step, "eval_loss": eval_after})
        last_ckpt = save()
        if self.parallel.mode == "fsdp":  # a plain model again (full weights on every rank) for generation
            self.model = self.parallel.unwrap()
            self.parallel = None
        losses = [loss for _, loss in state["train_loss"]]
        metrics = {
            "steps": loop.step,
            "total_steps": total_steps,
            "epochs": cfg.num_epochs,
            "n_train": len(train_ex),
            "n_eval": len(eval_ex),
            "train_loss": losses,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "eval_loss_before": state["eval_loss_before"],
            "eval_loss_after": eval_after,
            "bad_steps": loop.skipped_updates,
            "tokens_seen": state["tokens_seen"],
            "train_time_s": time.time() - start_time,
            "checkpoint": str(last_ckpt),
            "model_dir": str(Path(last_ckpt) / MODEL_NAME),
        }
        loop.log({"event": "done", **{k: v for k, v in metrics.items() if k != "train_loss"}})
        return metrics

    def _train_step(self, group: List[List[int]], examples: Sequence[SFTExample], optimizer, state) -> dict:
        """One optimiser step over `grad_accum_steps` micro-batches; a non-finite one is skipped
        (`"skipped": True`; the loop counts it and applies the bad-step policy)."""
        cfg = self.config
        micro = [collate([examples[i] for i in batch], self.tokenizer.pad_token_id, self._pack()) for batch in group]
        # Normalise by the answer tokens of the whole step, so accumulation equals one big batch.
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        # Under torchrun each rank takes its share of every micro-batch; its loss is scaled by the
        # number of ranks so that the mean over ranks (DDP/FSDP) is the whole step's gradient.
        shares = [ddp.shard(batch) for batch in group]
        scale = ddp.world_size() / max(n_tokens, 1)
        wrapped = self.parallel.wrapped
        optimizer.zero_grad(set_to_none=True)
        total_loss, finite = 0.0, True
        for number, (batch, share) in enumerate(zip(group, shares)):
            # Fewer examples than ranks: this rank adds zero gradient. Under DDP/FSDP it must still run
            # the forward and backward (they hold collectives): one example, weighted 0.
            rows = share or (batch[:1] if wrapped else [])
            loss = None
            if rows:
                loss_sum, _ = self._token_losses(collate([examples[i] for i in rows], self.tokenizer.pad_token_id,
                                                         self._pack()))
                loss = loss_sum * scale if ddp.world_size() > 1 else loss_sum / max(n_tokens, 1)
                if not share:
                    loss = loss * 0.0
            # every rank votes on every micro-batch before its backward, so all skip together
            if not ddp.all_true(loss is None or bool(torch.isfinite(loss))):
                finite = False
                break
            if loss is not None:
                last = number == len(group) - 1  # gradients are reduced over ranks in the last backward only
                with contextlib.nullcontext() if last else self.parallel.no_sync():
                    loss.backward()
                total_loss += float(loss.detach())
        total_loss = ddp.all_reduce_mean(total_loss) if finite else total_loss
        grad_norm = float("nan")
        lr = optimizer.param_groups[0]["lr"]
        if finite:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else None
            (grad_norm,), finite = clip_and_step([(self.model, optimizer, max_norm)])
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            return {"loss": None, "grad_norm": None, "lr": lr, "skipped": True, "tokens": n_tokens}
        state["train_loss"].append([state["step"] + 1, total_loss])
        state["tokens_seen"] += n_tokens
        return {"loss": total_loss, "grad_norm": grad_norm, "lr": lr, "skipped": False, "tokens": n_tokens}

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, optimizer, scheduler, fingerprint: str, state: dict) -> Path:
        sharded = parallel.is_sharded(self.model)  # FSDP: the optimiser goes with the model's shards (DCP)
        trainer_state = {
            **({} if sharded else {"optimizer": optimizer.state_dict()}),
            "scheduler": scheduler.state_dict(),
            "bad_steps": self.loop.skipped_updates,
            "train_loss": state["train_loss"],
            "eval_loss": state["eval_loss"],
            "eval_loss_before": state["eval_loss_before"],
            "tokens_seen": state["tokens_seen"],
            # the data order: each epoch's batches are length_bucketed_batches(seed, epoch)
            "data_seed": self.config.seed,
            "data_fingerprint": fingerprint,
        }
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        return self.loop.save(self.config.output_dir, {MODEL_NAME: self.model}, self.tokenizer, trainer_state,
                              metadata={"stage": "sft", "config": config}, optimizers={MODEL_NAME: optimizer})

    def _resume(self, path, optimizer, scheduler, fingerprint: str, state: dict) -> dict:
        def same_data(loaded) -> None:
            ts = loaded.trainer_state
            if ts.get("data_fingerprint") != fingerprint or ts.get("data_seed") != self.config.seed:
                raise ValueError(f"cannot resume from {loaded.path}: it was trained on different SFT data or seed "
                                 "(the data order would not match); use the same records and config.seed")

        loaded = self.loop.resume(path, check=same_data)
        ts = loaded.trainer_state
        load_models(loaded, {MODEL_NAME: self.model}, {MODEL_NAME: optimizer})
        if "optimizer" in ts:  # else it came with the sharded model (DCP)
            optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        state.update({k: ts[k] for k in ("train_loss", "eval_loss", "eval_loss_before", "tokens_seen")})
        state["step"] = self.loop.step
        return state
