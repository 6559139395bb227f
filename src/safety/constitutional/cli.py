"""The one command line of the pipeline and of its single-stage scripts.

`scripts/train_constitutional.py` runs every stage; `scripts/train_sft.py`, `train_reward_model.py`
and `train_ppo.py` run one stage with the same options. Options have one source, the `PipelineConfig`
dataclasses: a preset (configs/<name>.yaml), a YAML file (--config) and `--set section.name=value`.
The flags below are shortcuts for the most used of those keys, never a second set of defaults;
a stage script adds a few shortcuts of its own (`Shortcut`), each naming the key it sets.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

# flag (argparse dest) -> config key; every one of them is also reachable with --set
COMMON_SHORTCUTS = (("model", "model"), ("constitution", "constitution"), ("output_dir", "output_dir"),
                    ("judge_model", "judge_model"), ("guard_model", "guard_model"),
                    ("reward_model", "reward_model"), ("rl_algorithm", "rl.algorithm"), ("device", "device"),
                    ("dtype", "dtype"), ("precision", "precision"), ("seed", "seed"))


@dataclass(frozen=True)
class Shortcut:
    """A stage script's own flag: `--flag VALUE` is `--set key=VALUE` (or `key=const` for a switch)."""

    flag: str
    key: str
    help: str
    const: Optional[str] = None  # a switch without a value that sets key=const


def build_parser(description: str, stages: Optional[Sequence[str]] = None, shortcuts: Sequence[Shortcut] = (),
                 describe_all: bool = True) -> argparse.ArgumentParser:
    epilog = ""
    if describe_all:
        from .common.config import describe_options
        from .pipeline import PipelineConfig
        epilog = ("Every option below can be set in a YAML file (--config) or with --set section.name=value:\n"
                  + "\n".join(describe_options(PipelineConfig)))
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default",
                        help="smoke (tiny random model, seconds), default (SmolLM2-135M on CPU, about an hour on 2 cores), "
                             "full (sizes for a GPU); presets live in configs/<name>.yaml")
    parser.add_argument("--config", help="a YAML file whose options override the preset")
    parser.add_argument("--model", help="'default' (SmolLM2-135M-Instruct) or a local Hugging Face model folder: "
                                        "the model the first stage run starts from")
    parser.add_argument("--constitution", help="constitution YAML (default: data/constitution.yaml)")
    parser.add_argument("--judge-model", help="a local chat model folder as the model judge for every stage, instead of "
                             "the base model (adds 'judge' to the evaluators; e.g. a 7B instruct model on a GPU); "
                             "its prompts and weight: the constitution's judge: block")
    parser.add_argument("--guard-model", help="a local sequence-classification folder (guard classifier or reward "
                             "model) judging the principles that list 'guard'; labels: the constitution's guard: block")
    parser.add_argument("--reward-model", help="a trained reward model folder for RL and evaluation instead of "
                                               "stage 2's (e.g. from scripts/train_reward_model.py)")
    parser.add_argument("--output-dir", help="run folder (rerun with the same folder to resume)")
    if stages is None:
        parser.add_argument("--stages", help="comma-separated subset of: sft,reward,rl,evaluate")
    parser.add_argument("--rl-algorithm", help="stage-3 algorithm: ppo (default), grpo, rloo, reinforce, or dpo (DPO on "
                             "stage 2's preference pairs instead of RL against the reward model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument("--dtype", help="weights: float32 (default), bfloat16, float16")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                        help="matmuls: auto (default: bf16 on CUDA and on CPUs with native bf16, else fp32), bf16, fp32")
    parser.add_argument("--seed", type=int, help="seed for every random choice of the run")
    for s in shortcuts:
        if s.const is None:
            parser.add_argument(s.flag, dest=_dest(s), help=f"{s.help} (= --set {s.key}=VALUE)")
        else:
            parser.add_argument(s.flag, dest=_dest(s), action="store_true", help=f"{s.help} (= --set {s.key}={s.const})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        help="override any option listed below, e.g. --set rl.steps=40 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def _dest(s: Shortcut) -> str:
    return "shortcut_" + s.flag.lstrip("-").replace("-", "_")


def overrides_from_args(args, stages: Optional[Sequence[str]] = None, shortcuts: Sequence[Shortcut] = ()) -> List[str]:
    """The `--set` list the flags stand for: the script's stages, the shortcuts, then the explicit
    --set options (later ones win)."""
    chosen = ",".join(stages) if stages is not None else getattr(args, "stages", None)
    overrides = [f"stages=[{chosen}]"] if chosen else []
    for flag, key in COMMON_SHORTCUTS:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    for s in shortcuts:
        value = getattr(args, _dest(s))
        if s.const is None and value is not None:
            overrides.append(f"{s.key}={value}")
        elif s.const is not None and value:
            overrides.append(f"{s.key}={s.const}")
    return overrides + list(args.overrides)


def main(argv: Optional[Sequence[str]] = None, description: str = "", stages: Optional[Sequence[str]] = None,
         shortcuts: Sequence[Shortcut] = ()) -> int:
    """Parse, build the config, run the stages, print one line per stage; returns the exit code.
    `stages`: the fixed stages of a single-stage script (None: the --stages flag, default all)."""
    describe = argv is None and any(a in ("-h", "--help") for a in sys.argv[1:])
    args = build_parser(description, stages, shortcuts, describe_all=describe).parse_args(argv)
    from src.models import configure_threads
    configure_threads()  # $CAI_NUM_THREADS, else adaptive: the cores other processes leave free (src/models/threads.py)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .common import distributed as ddp
    from .common.config import ConfigError
    from .pipeline import Pipeline, load_pipeline_config, print_stage_line

    try:
        config = load_pipeline_config(args.preset, args.config, overrides_from_args(args, stages, shortcuts))
        if args.print_config:
            import dataclasses
            import yaml
            print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
            return 0
        pipeline = Pipeline(config)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    main_rank = ddp.is_main_process()  # under torchrun only rank 0 prints (and writes)
    if main_rank:
        ranks = f", {ddp.world_size()} processes" if ddp.world_size() > 1 else ""
        print(f"run folder: {pipeline.run_dir}  (preset {config.preset}, model {config.model}, "
              f"stages {','.join(config.stages)}, device {pipeline.device}{ranks})")
    try:
        pipeline.run(on_stage=print_stage_line if main_rank else None)
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except FileNotFoundError as err:  # an input the stages need is missing (a model folder, a prompt file)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        ddp.destroy_distributed()
    report = pipeline.run_dir / "report.md"
    if main_rank and report.is_file():
        print(f"\nreport: {report}")
    return 0
