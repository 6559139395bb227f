#!/usr/bin/env python
"""Throughput of every stage, measured, and (with --trl) against TRL's trainers in the same run.

    python scripts/benchmark.py                      # all sections, the default model, ours only
    python scripts/benchmark.py --trl                # also TRL's trainers, interleaved A/B/A/B
    python scripts/benchmark.py --only generation --model path/to/model --output bench.jsonl

Prints one JSON line per measurement. Sections are independent: one that fails prints
{"section": ..., "error": ...} and the rest still run.

What is measured (medians over --repeats; ours and TRL alternate run by run so that other load on
the machine hits both alike):
  matmul      attainable fp32/bf16 matmul FLOP/s on this machine with these threads
  generation  answer tokens/s at batch 1, 8 and 32 (`generation.generate`, KV cache, greedy), and the
              fraction of its roofline bound (weights read once per step at the measured read
              bandwidth, or the measured matmul rate); on CPU also with the int8 sampling copy
              (`src.models.int8_sampling_copy`)
  reward      reward-model training pairs/s at max length 256 (ours vs trl.RewardTrainer)
  sft         SFT tokens/s (ours vs trl.SFTTrainer)
  ppo         seconds for one PPO iteration: batch 8, answers up to 48 tokens, 4 PPO epochs
              (ours vs trl.experimental.ppo.PPOTrainer, see below)
  judge       seconds to judge 1,000 answers with the pipeline's default framework (rules + harm judge +
              refusal classifier): the labelled answers of data/labels in file order (about two
              answers per prompt), and one answer per prompt (each prompt's first, cycled)
  shared      a small train-like step alone and beside one single-threaded competing process, threads
              fixed at one per core vs adaptive (src/models/threads.py): the busy-machine slowdown
  pipeline    seconds per stage of the whole pipeline (`default` preset, every stage) on a small fixed
              workload (PIPELINE_WORKLOAD: 8 prompts per stage, 2 RL steps, 8 benchmark prompts)
Each line carries the peak memory of its run (RSS on CPU, torch.cuda.max_memory_allocated on GPU)
and `mfu`: achieved model FLOP/s over the measured matmul rate, with FLOPs per token 2N forward and
6N forward+backward, N counting every matmul weight including the LM head (not the embedding lookup).

TRL's PPOTrainer lives in trl.experimental.ppo from TRL 1.10 to 1.12 and was deleted in 1.13
(huggingface/trl#7020); requirements-bench.txt pins TRL 1.12.0, the newest release with it (it
runs with this project's transformers 5.x). With a TRL that has no PPO the comparison falls back to
its RLOOTrainer (the same rollout, reference and reward forwards and 4 updates on the batch, but no
value model, so strictly less work than our PPO iteration) and says so in `trl_trainer`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()

import torch  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from src.allocator import freed_memory_kept  # noqa: E402
from src.models import configure_threads, load_causal_lm, load_tokenizer, resolve_device, resolve_model_path  # noqa: E402
from src.models.checkpointing import enable_gradient_checkpointing  # noqa: E402
from src.models.heads import RewardModel  # noqa: E402
from src.models.precision import compute_dtype, set_precision  # noqa: E402

SECTIONS = ("matmul", "generation", "reward", "sft", "ppo", "judge", "pipeline", "shared")
PAIRS_PATH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"

# Fixed prompts: the same work every run, varied lengths so that padding is realistic.
PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a cat who learns to swim.",
    "What is photosynthesis?",
    "Describe the water cycle to a ten-year-old, step by step.",
    "How do I bake bread at home?",
    "Why is the sky blue?",
    "Tell me about the Roman empire and why it fell.",
    "What makes a good friend?",
]


# --------------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or RSS high-water mark reset via /proc (Linux).

    Resetting VmHWM (writing 5 to /proc/self/clear_refs) makes the figure per block, not per process;
    where that is unavailable the process-wide peak from `resource` is reported instead.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = None
        self.kind = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.kind = "rss_peak"
            except OSError:
                self.kind = "rss_peak_process"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            self.kind = "cuda_max_allocated"
        else:
            self.peak_mb = _rss_peak_mb()
        return False


def _rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> dict:
    """Best sustained matmul rate over a few shapes (square, and the model's (tokens, d) x (d, 4d))."""
    best, per_cpu = {}, {}
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (512, 576, 1536)] if device.type == "cpu" else \
        [(4096, 4096, 4096), (8192, 8192, 8192)]
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        count, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / len(shapes):
            a @ b
            count += 1
        sync(device)
        flop = 2 * m * k * n * count
        best[f"{m}x{k}x{n}"] = flop / (time.perf_counter() - t0)
        per_cpu[f"{m}x{k}x{n}"] = flop / max(time.process_time() - c0, 1e-9)
    return {"flops": max(best.values()), "flops_per_cpu_s": max(per_cpu.values()),
            "by_shape": {k: round(v / 1e9, 2) for k, v in best.items()}}


def read_bandwidth(device: torch.device, seconds: float = 1.0) -> float:
    """Bytes/s of a sum over a 512 MB fp32 tensor: how fast weights can stream from memory (the bound
    of few-row decoding, which reads every weight once per step)."""
    x = torch.ones(128 * 2**20, device=device)
    x.sum()
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.sum()
        count += 1
    sync(device)
    return x.numel() * 4 * count / (time.perf_counter() - t0)


def matmul_params(model) -> int:
    """N for FLOPs/token: every weight a token's activations are multiplied by.

    The input embedding is a lookup (no FLOPs), the LM head is a matmul: with tied embeddings the
    same tensor counts once, as the head. A scalar-head model has no LM head: its embedding is dropped.
    """
    total = sum(p.numel() for p in model.parameters())
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    if emb is None:
        return total
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        return total  # tied: the one matrix is used as the head
    return total - emb.weight.numel()


def median(xs):
    return statistics.median(xs) if xs else None


class Emitter:
    def __init__(self, output: str | None):
        self.file = open(output, "a") if output else None

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, default=_jsonable)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def _jsonable(x):
    if isinstance(x, float):
        return round(x, 4)
    return str(x)


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def make_config(cls, **kwargs):
    """A config dataclass from the keyword arguments it has (our trainers' fields may evolve)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


@contextlib.contextmanager
def quiet():
    """Silence the trainers' progress bars and HF's chatter while timing."""
    import logging
    import warnings
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        hf_logging = None
    # TRL's Trainer prints a metrics dict on stdout: keep stdout for our JSON lines only
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(prev)
            if hf_logging is not None:
                hf_logging.set_verbosity(hf_level)


# --------------------------------------------------------------------------------------------------
# context shared by the sections
# --------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.device = resolve_device(args.device)
        self.threads = configure_threads(args.threads) if self.device.type == "cpu" else torch.get_num_threads()
        self.model_path = resolve_model_path(args.model)
        # Weights fp32 on both sides; matmuls in the compute dtype (bf16 autocast for ours, TRL's bf16=True).
        set_precision(args.precision)
        self.dtype = torch.float32
        self.compute_dtype = compute_dtype(self.device) or torch.float32
        self.tokenizer = load_tokenizer(self.model_path)
        self.peak_flops = self.peak_flops_cpu = self.peak_flops_fp32 = self.read_bytes_per_s = None
        self.tmp = Path(tempfile.mkdtemp(prefix="cai-bench-"))
        self.small = args.small

    def policy(self):
        model, _ = load_causal_lm(self.model_path, device=self.device, dtype=self.dtype)
        return model

    def reward_model(self):
        return RewardModel.from_causal_lm(self.model_path, device=self.device, dtype=self.dtype,
                                          pad_token_id=self.tokenizer.pad_token_id)

    def mfu(self, flops_per_s: float, per_cpu: bool = False):
        """Fraction of the measured matmul rate in the compute dtype; `per_cpu`: both rates per CPU-second of
        this process (robust to other load on the machine, which stretches wall time but not CPU time)."""
        peak = self.peak_flops_cpu if per_cpu else self.peak_flops
        return None if not peak else flops_per_s / peak

    def pairs(self, n: int, max_length: int):
        """The first `n` training pairs whose chosen and rejected transcripts both fit in `max_length`.

        TRL's RewardTrainer drops over-long pairs while ours truncates them; pairs that fit make the
        two do the same work.
        """
        from src.safety.constitutional.common.pairs import PreferencePair, load_pairs
        pool = load_pairs(PAIRS_PATH, split="train") if PAIRS_PATH.exists() else []
        chosen = []
        for p in pool:
            if len(chosen) == n:
                break
            if max(self.pair_lengths(p)) <= max_length:
                chosen.append(p)
        # synthetic fallback (the benchmark must run without the shared data)
        while len(chosen) < n:
            i = len(chosen)
            chosen.append(PreferencePair([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                         "I can help with that. " * (max_length // 12), "No. " * 10))
        return chosen

    def pair_lengths(self, pair):
        return [len(self.tokenizer.apply_chat_template(
            pair.prompt + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False))
            for answer in (pair.chosen, pair.rejected)]

    def interleave(self, runners: dict, repeats: int):
        """Run each implementation `repeats` times in alternation: A B A B ... Returns name -> [results].

        First `--warmup` untimed rounds of each: the first run in a process pays for growing its heap
        (page faults on fresh memory, measured 20-27 s of system time in a first PPO iteration on a
        freshly booted VM), and whoever runs second reuses that memory; without a warm-up the first
        implementation is handicapped."""
        for _ in range(self.args.warmup):
            for fn in runners.values():
                gc.collect()
                fn()
        results = {name: [] for name in runners}
        for _ in range(repeats):
            for name, fn in runners.items():
                gc.collect()
                results[name].append(fn())
        return results


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------

def section_matmul(b: Bench):
    """The fp32 rate, and the compute dtype's when that is bf16: `mfu` is against the compute dtype's."""
    for dtype in dict.fromkeys([torch.float32, b.compute_dtype]):
        rate = matmul_flops(b.device, dtype, seconds=0.3 if b.small else 1.5)
        if dtype == torch.float32:
            b.peak_flops_fp32 = rate["flops"]
        b.peak_flops, b.peak_flops_cpu = rate["flops"], rate["flops_per_cpu_s"]
        line = {"section": "matmul", "dtype": str(dtype).replace("torch.", ""), "threads": b.threads,
                "gflops": rate["flops"] / 1e9, "gflops_per_cpu_s": rate["flops_per_cpu_s"] / 1e9,
                "by_shape_gflops": rate["by_shape"]}
        if dtype == torch.float32:
            b.read_bytes_per_s = read_bandwidth(b.device, seconds=0.3 if b.small else 1.0)
            line["read_gb_per_s"] = b.read_bytes_per_s / 1e9
        yield line


def section_generation(b: Bench):
    from src.models import int8_sampling_copy
    from src.safety.constitutional.training.generation import GenerationConfig, generate

    model = b.policy()
    model.eval()
    n_params = matmul_params(model)
    new_tokens = 16 if b.small else 64
    # The int8 copy (CPU) is for sampling-only stages. Every line has mfu against the compute dtype's rate
    # and mfu_vs_fp32_rate.
    variants = [("ours", model)] + ([("ours_int8", int8_sampling_copy(model))] if b.device.type == "cpu" else [])
    for batch in (1, 8, 32):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, batch_size=batch)
        for impl, m in variants:
            generate(m, b.tokenizer, prompts, GenerationConfig(max_new_tokens=2, do_sample=False,
                                                               batch_size=batch))  # warm-up
        runs = {impl: [] for impl, _ in variants}
        mem = {impl: 0.0 for impl, _ in variants}
        for _ in range(b.args.repeats):
            for impl, m in variants:  # interleaved, so load from other processes hits both alike
                with PeakMemory(b.device) as pm:
                    sync(b.device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = generate(m, b.tokenizer, prompts, cfg)
                    sync(b.device)
                    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                tokens = int(out.response_mask.sum())
                runs[impl].append((tokens / dt, tokens, dt, tokens / cpu))
                mem[impl] = max(mem[impl], pm.peak_mb)
        for impl, _ in variants:
            r = runs[impl]
            tps = median([x[0] for x in r])
            yield _round({"section": "generation", "impl": impl, "batch": batch, "max_new_tokens": new_tokens,
                          "tokens_per_s": tps, "answer_tokens": r[0][1], "seconds_median": median([x[2] for x in r]),
                          "runs_tokens_per_s": [round(x[0], 2) for x in r], "peak_mem_mb": mem[impl],
                          "tokens_per_cpu_s": median([x[3] for x in r]),
                          "params_for_flops": n_params, "mfu": b.mfu(tps * 2 * n_params),
                          "mfu_vs_fp32_rate": tps * 2 * n_params / b.peak_flops_fp32 if b.peak_flops_fp32 else None,
                          "mfu_cpu_time": b.mfu(median([x[3] for x in r]) * 2 * n_params, per_cpu=True),
                          **(decode_bound(b, model, batch, n_params, tps) if impl == "ours" else {})})


def decode_bound(b: Bench, model, batch: int, n_params: int, tokens_per_s: float) -> dict:
    """The roofline of decoding `batch` rows: each step reads every weight once in the compute dtype
    (the bf16 twin's under bf16; memory bound, from the measured read bandwidth) and does 2 x params
    FLOPs per token (compute bound, from the compute dtype's measured matmul rate); the bound is the
    lower of the two."""
    if not (b.read_bytes_per_s and b.peak_flops):
        return {}
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.finfo(b.compute_dtype).bits // 8
    memory = batch * b.read_bytes_per_s / weight_bytes
    compute = b.peak_flops / (2 * n_params)
    bound = min(memory, compute)
    return {"weight_bytes": weight_bytes, "bound_tokens_per_s": bound,
            "bound_kind": "memory" if memory <= compute else "compute", "fraction_of_bound": tokens_per_s / bound}


# .. reward model ..................................................................................

def _reward_workload(b: Bench):
    batch = 8
    steps = 1 if b.small else 2
    max_length = 64 if b.small else 256
    return batch, steps, max_length, b.pairs(batch * steps, max_length)


def _our_reward(b: Bench, pairs, batch, max_length):
    from src.safety.constitutional.training.reward_training import RewardTrainer, RewardTrainerConfig

    rm = b.reward_model()
    cfg = make_config(RewardTrainerConfig, output_dir=str(b.tmp / "rm"), num_epochs=1, batch_size=batch,
                      learning_rate=1e-5, max_length=max_length, eval_fraction=0.0, show_progress=False,
                      warmup_ratio=0.0, log_every=10**9)
    if b.args.gradient_checkpointing:  # RewardTrainerConfig has no switch: set it on the model
        enable_gradient_checkpointing(rm)
    trainer = RewardTrainer(rm, b.tokenizer, cfg)
    # checkpoint writes are I/O, not training: left out on both sides (TRL runs with save_strategy="no")
    trainer.save_checkpoint = lambda *a, **k: None
    trainer.save_final = lambda *a, **k: None
    with PeakMemory(b.device) as pm, quiet():
        sync(b.device)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train(pairs)
        sync(b.device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = _pair_tokens(b, pairs, max_length)
    n = matmul_params(rm.model)
    del trainer, rm
    return {"seconds": dt, "cpu_seconds": cpu, "peak_mem_mb": pm.peak_mb, "tokens": tokens, "n_params": n}


def _pair_tokens(b: Bench, pairs, max_length):
    total = 0
    for p in pairs:
        for answer in (p.chosen, p.rejected):
            text = b.tokenizer.apply_chat_template(p.prompt + [{"role": "assistant", "content": answer}],
                                                   tokenize=False)
            total += min(max_length, len(b.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return total


class _Timer:
    """A TrainerCallback timing train begin -> end (TRL/HF Trainer's own setup is excluded)."""

    def __new__(cls, device):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.t0 = self.t1 = None

            def on_train_begin(self, args, state, control, **kw):
                sync(device)
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_train_end(self, args, state, control, **kw):
                sync(device)
                self.t1, self.c1 = time.perf_counter(), time.process_time()

            @property
            def seconds(self):
                return self.t1 - self.t0

            @property
            def cpu_seconds(self):
                return self.c1 - self.c0

        return Timer()


def _trl_common(b: Bench, batch: int, steps: int, name: str) -> dict:
    return dict(output_dir=str(b.tmp / name), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
                use_cpu=b.device.type == "cpu", bf16=b.compute_dtype == torch.bfloat16, seed=0,
                dataloader_num_workers=0, max_grad_norm=1.0,
                # TRL's configs default to gradient checkpointing (~1/3 more compute, less memory);
                # ours default to off. Equivalent settings: off on both sides.
                gradient_checkpointing=b.args.gradient_checkpointing)


def _trl_reward(b: Bench, pairs, batch, max_length):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rm = b.reward_model().model  # the plain AutoModelForSequenceClassification
    data = Dataset.from_list([{"chosen": p.prompt + [{"role": "assistant", "content": p.chosen}],
                               "rejected": p.prompt + [{"role": "assistant", "content": p.rejected}]}
                              for p in pairs])
    steps = len(pairs) // batch
    args = RewardConfig(**_trl_common(b, batch, steps, "trl-rm"), max_length=max_length)
    timer = _Timer(b.device)
    with quiet():
        trainer = RewardTrainer(model=rm, args=args, train_dataset=data, processing_class=b.tokenizer,
                                callbacks=[timer])
        with PeakMemory(b.device) as pm:
            trainer.train()
    tokens = _pair_tokens(b, pairs, max_length)
    del trainer, rm
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "peak_mem_mb": pm.peak_mb, "tokens": tokens,
            "n_params": None}


def _report_training(b, section, results, unit_count, unit_name, flops_per_token_mult, extra):
    lines = []
    for impl, runs in results.items():
        secs = [r["seconds"] for r in runs]
        med = median(secs)
        tokens = runs[0]["tokens"]
        n = runs[0].get("n_params") or results[next(iter(results))][0]["n_params"]
        cpu = median([r["cpu_seconds"] for r in runs])
        rec = {"section": section, "impl": impl, f"{unit_name}_per_s": unit_count / med, "seconds_median": med,
               "cpu_seconds_median": cpu, "runs_seconds": [round(s, 3) for s in secs], "tokens": tokens,
               "tokens_per_s": tokens / med, "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
               "mfu": b.mfu(flops_per_token_mult * n * tokens / med) if n else None,
               "mfu_cpu_time": b.mfu(flops_per_token_mult * n * tokens / cpu, per_cpu=True) if n else None, **extra}
        lines.append(_round(rec))
    if "ours" in results and len(results) > 1:
        for other in results:
            if other != "ours":
                lines.append(_round({"section": section, "impl": f"speedup_vs_{other}",
                                     **_speedups(results[other], results["ours"])}))
    return lines


def _speedups(theirs, ours) -> dict:
    """Median wall seconds theirs/ours, per-pair ratios (runs were interleaved), and the CPU-time ratio."""
    pairs = [t["seconds"] / o["seconds"] for t, o in zip(theirs, ours)]
    return {"speedup": median([r["seconds"] for r in theirs]) / median([r["seconds"] for r in ours]),
            "speedup_per_pair": [round(x, 3) for x in pairs],
            "speedup_cpu_time": median([r["cpu_seconds"] for r in theirs]) / median([r["cpu_seconds"] for r in ours]),
            "note": "theirs / ours: median seconds of runs interleaved A/B/A/B; cpu_time: process CPU seconds"}


def _safe(fn, errors: dict, name: str):
    """One implementation failing must not stop the other: record the error, return None."""
    def run():
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            errors.setdefault(name, f"{type(exc).__name__}: {exc}")
            if b_verbose():
                traceback.print_exc()
            return None
    return run


_VERBOSE = False


def b_verbose():
    return _VERBOSE


def _run_pair(b: Bench, section: str, ours, trl):
    errors: dict = {}
    runners = {}
    if not b.args.trl_only:
        runners["ours"] = _safe(ours, errors, "ours")
    if b.args.trl and trl is not None:
        runners["trl"] = _safe(trl, errors, "trl")
    results = b.interleave(runners, b.args.repeats)
    results = {k: [r for r in v if r is not None] for k, v in results.items()}
    results = {k: v for k, v in results.items() if v}
    err_lines = [{"section": section, "impl": k, "error": v} for k, v in errors.items()]
    return results, err_lines


def section_reward(b: Bench):
    batch, steps, max_length, pairs = _reward_workload(b)
    results, errs = _run_pair(b, "reward",
                              lambda: _our_reward(b, pairs, batch, max_length),
                              lambda: _trl_reward(b, pairs, batch, max_length))
    yield from errs
    yield from _report_training(b, "reward", results, len(pairs), "pairs", 6,
                                {"batch_pairs": batch, "steps": steps, "max_length": max_length})


# .. SFT ...........................................................................................

def _sft_workload(b: Bench):
    batch = 8
    steps = 1 if b.small else 2
    max_length = 64 if b.small else 256
    pairs = b.pairs(batch * steps, max_length)
    records = [{"prompt": p.prompt, "response": p.chosen} for p in pairs]
    return batch, steps, max_length, records


def _sft_tokens(b: Bench, records, max_length):
    total = 0
    for r in records:
        text = b.tokenizer.apply_chat_template(list(r["prompt"]) + [{"role": "assistant", "content": r["response"]}],
                                               tokenize=False)
        total += min(max_length, len(b.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return total


def _our_sft(b: Bench, records, batch, max_length):
    from src.safety.constitutional.training.sft import SFTConfig, SFTTrainer

    model = b.policy()
    cfg = make_config(SFTConfig, output_dir=str(b.tmp / "sft"), num_epochs=1, batch_size=batch,
                      learning_rate=1e-5, lr_schedule="constant", warmup_ratio=0.0, max_seq_len=max_length,
                      eval_fraction=0.0, show_progress=False, gradient_checkpointing=b.args.gradient_checkpointing)
    trainer = SFTTrainer(model, b.tokenizer, cfg)
    trainer._save = lambda *a, **k: b.tmp / "sft-not-saved"  # I/O left out, as on the TRL side
    with PeakMemory(b.device) as pm, quiet():
        sync(b.device)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train(records, eval_records=[])
        sync(b.device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = matmul_params(model)
    del trainer, model
    return {"seconds": dt, "cpu_seconds": cpu, "peak_mem_mb": pm.peak_mb, "tokens": _sft_tokens(b, records, max_length), "n_params": n}


def _trl_sft(b: Bench, records, batch, max_length):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = b.policy()
    data = Dataset.from_list([{"prompt": list(r["prompt"]),
                               "completion": [{"role": "assistant", "content": r["response"]}]} for r in records])
    steps = len(records) // batch
    args = SFTConfig(**_trl_common(b, batch, steps, "trl-sft"), max_length=max_length, packing=False)
    timer = _Timer(b.device)
    with quiet():
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=b.tokenizer,
                             callbacks=[timer])
        with PeakMemory(b.device) as pm:
            trainer.train()
    n = matmul_params(model)
    del trainer, model
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "peak_mem_mb": pm.peak_mb, "tokens": _sft_tokens(b, records, max_length),
            "n_params": n}


def section_sft(b: Bench):
    batch, steps, max_length, records = _sft_workload(b)
    results, errs = _run_pair(b, "sft",
                              lambda: _our_sft(b, records, batch, max_length),
                              lambda: _trl_sft(b, records, batch, max_length))
    yield from errs
    yield from _report_training(b, "sft", results, len(records), "examples", 6,
                                {"batch": batch, "steps": steps, "max_length": max_length})


# .. PPO ...........................................................................................

PPO_BATCH, PPO_ANSWER, PPO_EPOCHS, PPO_TEMPERATURE = 8, 48, 4, 1.0


def _our_ppo(b: Bench, prompts, answer_len, overrides=None):
    from src.safety.constitutional.rl.ppo_trainer import PPOConfig, PPOTrainer

    torch.manual_seed(0)  # the reward and value heads start from the same draws in every run
    policy = b.policy()
    rm = b.reward_model()
    cfg = make_config(PPOConfig, **{**dict(learning_rate=1e-5, kl_penalty=0.05, reward_normalization="none",
                                           gradient_checkpointing=b.args.gradient_checkpointing, lora_r=b.args.lora_r,
                                           lora_alpha=16.0), **(overrides or {})})
    trainer = PPOTrainer(policy, None, rm, b.tokenizer, b.device, config=cfg)
    torch.manual_seed(0)
    with PeakMemory(b.device) as pm, quiet():
        sync(b.device)
        t0, c0 = time.perf_counter(), time.process_time()
        stats = trainer.train_step(prompts, num_epochs_per_batch=PPO_EPOCHS, max_length=answer_len,
                                   temperature=PPO_TEMPERATURE)
        sync(b.device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = stats if isinstance(stats, dict) else {}
    ro = getattr(trainer, "last_rollout", None)  # the shapes, for counting FLOPs
    shape = {} if ro is None else {"prompt_width": ro.prompt_width, "answer_width": ro.mask.shape[1]}
    if overrides is not None:  # --ppo-variants: what the step computed, to compare variants run to run
        import hashlib
        digest = hashlib.sha1()
        for p in trainer.policy.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        shape["step_stats"] = {k: stats.get(k) for k in ("policy_loss", "value_loss", "approx_kl", "ratio_max",
                                                        "clipfrac", "explained_variance", "mean_score")}
        shape["policy_sha1"] = digest.hexdigest()[:16]
    del trainer, policy, rm
    return {"seconds": dt, "cpu_seconds": cpu, "peak_mem_mb": pm.peak_mb,
            "answer_tokens_mean": stats.get("answer_length"), "rollout_seconds": stats.get("time_rollout_s"), **shape}


def _trl_ppo(b: Bench, prompts, answer_len):
    try:  # TRL 1.10-1.12 ship PPO under trl.experimental.ppo; 1.13 deleted it
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        return _trl_rloo(b, prompts, answer_len)
    import copy

    from datasets import Dataset

    policy = b.policy()
    ref = None if b.args.lora_r else b.policy()  # with LoRA TRL, like ours, uses the adapter-free policy
    rm, value = b.reward_model().model, b.reward_model().model  # value model initialised as TRL's examples do
    tok = copy.deepcopy(b.tokenizer)
    tok.padding_side = "left"  # TRL pads the queries with the tokenizer's side and generates from them
    data = Dataset.from_list([{"input_ids": tok.apply_chat_template([{"role": "user", "content": p}],
                                                                   add_generation_prompt=True, tokenize=True,
                                                                   return_dict=False)} for p in prompts])
    common = _trl_common(b, PPO_BATCH, 1, "trl-ppo")
    # Equivalent to ours: one rollout of 8, 4 epochs over it as one mini-batch, KL 0.05 (k1) in the
    # reward, stop at end-of-turn, no sample generations, no reward whitening.
    args = PPOConfig(**common, total_episodes=PPO_BATCH, num_mini_batches=1, num_ppo_epochs=PPO_EPOCHS,
                     response_length=answer_len, local_rollout_forward_batch_size=PPO_BATCH,
                     num_sample_generations=0, stop_token="eos", temperature=PPO_TEMPERATURE,
                     kl_coef=0.05, whiten_rewards=False)
    timer = _Timer(b.device)
    with quiet():
        peft = {}
        if b.args.lora_r:
            from peft import LoraConfig
            peft["peft_config"] = LoraConfig(r=b.args.lora_r, lora_alpha=16.0, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             train_dataset=data, value_model=value, callbacks=[timer], **peft)
        torch.manual_seed(0)
        with PeakMemory(b.device) as pm:
            trainer.train()
    del trainer, policy, ref, rm, value
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "peak_mem_mb": pm.peak_mb,
            "trl_trainer": "PPOTrainer"}


def _trl_rloo(b: Bench, prompts, answer_len):
    """TRL >= 1.13 has no PPO: its nearest on-policy trainer (no value model, so less work than ours)."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    policy = b.policy()
    rm = b.reward_model().model
    # RLOO needs >= 2 samples per prompt: 4 prompts x 2 = the 8 rollouts of one PPO batch.
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts[:PPO_BATCH // 2]])
    common = _trl_common(b, PPO_BATCH, PPO_EPOCHS, "trl-rloo")
    args = RLOOConfig(**common, num_generations=2, max_completion_length=answer_len, temperature=PPO_TEMPERATURE,
                      num_iterations=PPO_EPOCHS, steps_per_generation=1, beta=0.05, top_k=0, top_p=1.0)
    timer = _Timer(b.device)
    with quiet():
        trainer = RLOOTrainer(model=policy, reward_funcs=rm, args=args, train_dataset=data,
                              processing_class=b.tokenizer, reward_processing_classes=b.tokenizer,
                              callbacks=[timer])
        torch.manual_seed(0)
        with PeakMemory(b.device) as pm:
            trainer.train()
    del trainer, policy, rm
    return {"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "peak_mem_mb": pm.peak_mb, "trl_trainer": "RLOOTrainer"}


def parse_ppo_variants(text: str) -> dict:
    """"A;k=v,k=v;..." -> {label: overrides of our PPOConfig}; "default" (or empty) is no override."""
    import yaml
    variants = {}
    for part in text.split(";"):
        part = part.strip()
        overrides = {}
        if part and part != "default":
            for item in part.split(","):
                key, _, value = item.partition("=")
                if not _:
                    raise ValueError(f"--ppo-variants: {item!r} is not KEY=VALUE")
                overrides[key.strip()] = yaml.safe_load(value.strip())
        variants[part or "default"] = overrides
    return variants


def ppo_iteration_flops(config, batch: int, prompt_width: int, answer_width: int, epochs: int,
                        mini_batch_size, critic_layers, reward_layers: int, old_from_update: bool) -> dict:
    """Matmul FLOPs of one PPO iteration by part, counted from the model's shapes: 2 per weight per
    token forward, 6 forward+backward (GFLOP); attention's (T, T) products and the embedding lookups are left out.
    Every forward runs over the padded width W = P + R; only the R answer positions go through the LM head
    (logprobs.sequence_logprobs); the critic and the reward model have a scalar head (free). Generation:
    the prompt once (prefill) and R decoding steps of every layer and the head, all rows."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    lm_head = h * config.vocab_size
    B, P, R = batch, prompt_width, answer_width
    W = P + R
    critic_layers = min(critic_layers or layers, layers)
    size = min(mini_batch_size or B, B)
    old_rows = B - size if old_from_update else B  # rows the rollout's no-grad policy/critic forward covers
    policy_fwd = per_layer * layers * W + lm_head * R  # weights x tokens per row
    parts = {"generation": 2 * B * (per_layer * layers * (P + R) + lm_head * R),
             "old_logprobs": 2 * old_rows * policy_fwd,
             "old_values": 2 * old_rows * per_layer * critic_layers * W,
             "reference": 2 * B * policy_fwd,
             "reward": 2 * B * per_layer * reward_layers * W,
             "update_policy": 6 * epochs * B * policy_fwd,
             "update_critic": 6 * epochs * B * per_layer * critic_layers * W}
    parts["total"] = sum(parts.values())
    return {k: round(v / 1e9, 1) for k, v in parts.items()}


def section_ppo_variants(b: Bench, prompts, answer_len):
    """`--ppo-variants`: our PPO iteration under several PPOConfig overrides, interleaved A/B/C/A/B/C."""
    from src.safety.constitutional.rl.ppo_trainer import PPOConfig
    variants = parse_ppo_variants(b.args.ppo_variants)
    names = {f.name for f in fields(PPOConfig)}
    for overrides in variants.values():
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"--ppo-variants: PPOConfig has no field(s) {sorted(unknown)}")
    errors: dict = {}
    runners = {label: _safe(lambda o=overrides: _our_ppo(b, prompts, answer_len, o), errors, label)
               for label, overrides in variants.items()}
    results = b.interleave(runners, b.args.repeats)
    yield from ({"section": "ppo", "variant": k, "error": v} for k, v in errors.items())
    from transformers import AutoConfig
    model_config = AutoConfig.from_pretrained(b.model_path)
    for label, runs in results.items():
        runs = [r for r in runs if r is not None]
        if not runs:
            continue
        cfg = PPOConfig(**{"learning_rate": 1e-5, **variants[label]})
        flops = None
        if runs[0].get("prompt_width") is not None:
            flops = ppo_iteration_flops(model_config, PPO_BATCH, runs[0]["prompt_width"], runs[0]["answer_width"],
                                        PPO_EPOCHS, cfg.mini_batch_size, cfg.value_keep_layers,
                                        model_config.num_hidden_layers, cfg.old_values_from_update)
        secs = [r["seconds"] for r in runs]
        updates = [r["seconds"] - r["rollout_seconds"] for r in runs if r.get("rollout_seconds")]
        yield _round({"section": "ppo", "impl": "ours", "variant": label, "overrides": variants[label],
                      "seconds_median": median(secs), "runs_seconds": [round(x, 3) for x in secs],
                      "cpu_seconds_median": median([r["cpu_seconds"] for r in runs]),
                      "rollout_seconds_median": median([r["rollout_seconds"] for r in runs if r.get("rollout_seconds")]),
                      "after_rollout_seconds_median": median(updates) if updates else None,
                      "answer_tokens_mean": runs[0].get("answer_tokens_mean"), "batch": PPO_BATCH,
                      "prompt_width": runs[0].get("prompt_width"), "answer_width": runs[0].get("answer_width"),
                      "step_stats": [r.get("step_stats") for r in runs], "policy_sha1": [r.get("policy_sha1") for r in runs],
                      "answer_tokens_max": answer_len, "ppo_epochs": PPO_EPOCHS, "analytic_gflop": flops,
                      "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None})


def section_ppo(b: Bench):
    answer_len = 8 if b.small else PPO_ANSWER
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(PPO_BATCH)]
    if b.args.ppo_variants:
        yield from section_ppo_variants(b, prompts, answer_len)
        return
    results, errs = _run_pair(b, "ppo", lambda: _our_ppo(b, prompts, answer_len),
                              lambda: _trl_ppo(b, prompts, answer_len))
    yield from errs
    for impl, runs in results.items():
        secs = [r["seconds"] for r in runs]
        rec = {"section": "ppo", "impl": impl, "seconds_median": median(secs),
               "cpu_seconds_median": median([r["cpu_seconds"] for r in runs]), "runs_seconds": [round(s, 3) for s in secs],
               "batch": PPO_BATCH, "answer_tokens_max": answer_len, "ppo_epochs": PPO_EPOCHS, "lora_r": b.args.lora_r,
               "peak_mem_mb": max(r["peak_mem_mb"] for r in runs)}
        if impl == "trl":
            rec["trl_trainer"] = runs[0]["trl_trainer"]
        else:
            rec["answer_tokens_mean"] = runs[0].get("answer_tokens_mean")
            rec["rollout_seconds_median"] = median([r["rollout_seconds"] for r in runs if r.get("rollout_seconds")])
        yield _round(rec)
    if "ours" in results and "trl" in results:
        yield _round({"section": "ppo", "impl": "speedup_vs_trl", **_speedups(results["trl"], results["ours"])})


# .. judging .......................................................................................

def section_judge(b: Bench):
    """The default framework of the pipeline, built as the pipeline builds it, on real answers."""
    from src.safety.constitutional.common.io import read_jsonl
    from src.safety.constitutional.judging.framework import ConstitutionalFramework

    rows = read_jsonl(ROOT / "data" / "labels" / "refusal_labels.jsonl", skip_torn_tail=False)
    n = 24 if b.small else 1000
    first = list({json.dumps(r["prompt"], sort_keys=True): r for r in reversed(rows)}.values())[::-1]
    workloads = {"labelled answers in file order": [rows[i % len(rows)] for i in range(n)],
                 "one answer per prompt": [first[i % len(first)] for i in range(n)]}
    t0 = time.perf_counter()
    framework = ConstitutionalFramework(harm_judge="default", refusal_classifier="default",
                                        device=str(b.device))
    framework.evaluate_batch([r["prompt"] for r in rows[:4]], [r["completion"] for r in rows[:4]])  # loads the backbone
    load_s = time.perf_counter() - t0
    for workload, chosen in workloads.items():
        prompts, answers = [r["prompt"] for r in chosen], [r["completion"] for r in chosen]
        for evaluator in framework.evaluators.values():  # time real work, not the backbone's encoding cache
            getattr(getattr(evaluator, "features", None), "_recent", {}).clear()
        with PeakMemory(b.device) as pm:
            t0, c0 = time.perf_counter(), time.process_time()
            results = framework.evaluate_batch(prompts, answers, kinds=[r["kind"] for r in chosen])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        yield _round({"section": "judge", "workload": workload, "answers": n,
                      "distinct_prompts": len({json.dumps(p, sort_keys=True) for p in prompts}),
                      "seconds": dt, "answers_per_s": n / dt, "cpu_seconds": cpu, "load_seconds": load_s,
                      "evaluators": list(framework.evaluators), "refusal_classifier": True,
                      "refused": sum(r.refused for r in results), "peak_mem_mb": pm.peak_mb})


# Another job on the machine: one thread of matmuls, like a second training run with CAI_NUM_THREADS=1.
COMPETITOR = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def shared_child(mode: str, model_name: str, repeats: int, small: bool) -> None:
    """In a fresh process: seconds per step of a small train-like workload (a generation batch, then a
    forward, backward and AdamW step), threads fixed at one per core or adaptive (src/models/threads.py)."""
    from src.models.threads import adapt_threads, available_cpus
    from src.safety.constitutional.training.generation import GenerationConfig, generate

    configure_threads(available_cpus() if mode == "fixed" else 0)
    tokenizer = load_tokenizer(resolve_model_path(model_name))
    model, _ = load_causal_lm(resolve_model_path(model_name))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    prompts = PROMPTS[:8]
    config = GenerationConfig(max_new_tokens=8 if small else 24, do_sample=False, batch_size=8)

    def step():
        answers = generate(model, tokenizer, prompts, config).texts
        model.train()
        ids = tokenizer([p + " " + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True).input_ids
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adapt_threads()

    step()  # warm-up (and the governor's first window)
    seconds, threads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
        threads.append(torch.get_num_threads())
    print(json.dumps({"step_s": seconds, "threads": threads}), flush=True)


def section_shared(b: Bench):
    """A busy machine: the same workload alone and beside one single-threaded competing process, with
    threads fixed at one per core (what torch does by default) and adaptive (this toolkit's default)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "CAI_NUM_THREADS"}
    repeats = 1 if b.small else max(3, b.args.repeats)
    for mode in ("fixed", "adaptive"):
        alone = None
        for other in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if other else None
            try:
                out = subprocess.run([sys.executable, __file__, "--shared-child", mode, "--model", b.args.model,
                                      "--repeats", str(repeats)] + (["--small"] if b.small else []),
                                     env=env, capture_output=True, text=True, check=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            result = json.loads(out.stdout.strip().splitlines()[-1])
            step_s = median(result["step_s"])
            alone = step_s if not other else alone
            yield _round({"section": "shared", "threads": mode, "other_process": other, "step_s": step_s,
                          "threads_used": result["threads"],
                          **({"slowdown_vs_alone": step_s / alone} if other else {})})


# The default preset cut to a fixed small workload: every stage's code path, seconds instead of an hour.
PIPELINE_WORKLOAD = ["data.num_sft_prompts=8", "data.num_preference_prompts=8", "data.num_human_pairs=64",
                     "data.num_rl_prompts=8", "data.num_rl_benign_prompts=8", "data.num_eval_prompts=8",
                     "rl.steps=2", "rl.checkpoint_freq=2", "evaluation.benchmark_limit=8"]
PIPELINE_SMALL = ["model=tiny", "evaluation.benchmark_limit=2", "rl.steps=1", "data.num_human_pairs=8",
                  "evaluators=[rules]", "refusal_classifier=null", "critique.generation.max_new_tokens=8",
                  "preferences.generation.max_new_tokens=8", "evaluation.max_new_tokens=8",
                  "evaluation.benchmark_max_new_tokens=8"]  # plumbing only (tests)


def section_pipeline(b: Bench):
    """The whole pipeline (the `default` preset on --model, every stage) on PIPELINE_WORKLOAD: seconds per
    stage, so that a regression in any stage shows; --small runs it on the tiny model."""
    from src.safety.constitutional.pipeline import Pipeline, load_pipeline_config

    overrides = PIPELINE_WORKLOAD + (PIPELINE_SMALL if b.small else [f"model={b.args.model}"])
    config = load_pipeline_config("default", None, overrides + [f"output_dir={b.tmp / 'pipeline'}",
                                                                f"device={b.device.type}"])
    with PeakMemory(b.device) as pm, quiet():
        t0, c0 = time.perf_counter(), time.process_time()
        results = Pipeline(config).run()
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    for stage, summary in results.items():
        yield _round({"section": "pipeline", "stage": stage, "seconds": summary["seconds"]})
    yield _round({"section": "pipeline", "stage": "total", "seconds": total, "cpu_seconds": cpu,
                  "workload": overrides, "peak_mem_mb": pm.peak_mb})


SECTION_FNS = {"matmul": section_matmul, "generation": section_generation, "reward": section_reward,
               "sft": section_sft, "ppo": section_ppo,
               "judge": section_judge, "pipeline": section_pipeline, "shared": section_shared}


# --------------------------------------------------------------------------------------------------

def machine_info(b: Bench) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"section": "machine", "cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": b.threads, "device": str(b.device), "weights_dtype": str(b.dtype).replace("torch.", ""),
            "compute_dtype": str(b.compute_dtype).replace("torch.", ""),
            "model": str(b.model_path), "repeats": b.args.repeats, "lora_r": b.args.lora_r,
            # with glibc keeping freed memory RSS never falls, so peak_mem_mb is the process's high-water
            # mark so far, not the run's: measure memory with CAI_KEEP_FREED_MEMORY=0
            "allocator_keeps_freed_memory": freed_memory_kept(),
            "warmup": b.args.warmup}
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if b.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(b.device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
        import trl
        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections out of {','.join(SECTIONS)} (matmul always runs first)")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model dir")
    p.add_argument("--trl", action="store_true", help="also run TRL's trainers (pip install -r requirements-bench.txt)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per measurement, ours and TRL alternating; the median is reported")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds of each implementation before the timed ones (reward, sft, ppo)")
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: configure_threads())")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="matmul precision on both sides: auto (the default, or $CAI_PRECISION: bf16 on CUDA and CPUs "
                        "with native bf16; TRL gets bf16=True then), bf16, fp32. Weights stay fp32 in every case")
    p.add_argument("--trl-only", action="store_true", help="run only TRL's side of the comparisons (implies --trl)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="turn gradient checkpointing on in both ours and TRL's trainers (default: off in both)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="PPO only: LoRA of this rank on the policy, both sides (TRL through peft_config); 0: off")
    p.add_argument("--ppo-variants", default=None,
                   help="PPO only: our iteration under several PPOConfig overrides instead of ours vs TRL, interleaved "
                        "A/B/C; variants separated by ';', overrides by ',', e.g. "
                        "\"default;old_values_from_update=true;old_values_from_update=true,value_keep_layers=8\"")
    p.add_argument("--small", action="store_true", help="tiny workloads (for tests and quick checks)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing sections")
    p.add_argument("--shared-child", choices=("fixed", "adaptive"), help=argparse.SUPPRESS)  # section_shared's worker
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.trl = args.trl or args.trl_only
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    global _VERBOSE
    args = parse_args(argv)
    _VERBOSE = args.verbose
    if args.shared_child:
        shared_child(args.shared_child, args.model, args.repeats, args.small)
        return 0
    emit = Emitter(args.output)
    b = Bench(args)
    if args.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            emit({"section": "trl", "error": "trl is not installed: pip install -r requirements-bench.txt"})
            args.trl = False
    emit(machine_info(b))
    sections = ["matmul"] + [s for s in args.only if s != "matmul"]
    failed = 0
    for name in sections:
        t0 = time.perf_counter()
        try:
            for record in SECTION_FNS[name](b):
                emit(record)
        except Exception as exc:  # noqa: BLE001 - one section failing must not stop the others
            failed += 1
            if args.verbose:
                traceback.print_exc()
            emit({"section": name, "error": f"{type(exc).__name__}: {exc}"})
        if args.verbose:
            print(f"# {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 1 if failed == len(sections) else 0


if __name__ == "__main__":
    sys.exit(main())
