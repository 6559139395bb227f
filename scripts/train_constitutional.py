"""Run the whole Constitutional-AI pipeline: critique-revise SFT, AI-feedback reward model, RL, evaluation.

Examples:
  python scripts/train_constitutional.py                       # default preset, default model, CPU ok
  python scripts/train_constitutional.py --preset smoke        # tiny model, seconds
  python scripts/train_constitutional.py --model path/to/hf_model --output-dir runs/mine --set rl.steps=40
  python scripts/train_constitutional.py --stages evaluate     # only (re)evaluate an existing run
  python scripts/train_constitutional.py --preset full --judge-model path/to/7b-instruct   # a strong judge (GPU)

Rerunning the same command skips finished stages and resumes an interrupted one from its last checkpoint.
"""
import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # before torch loads: restart once with glibc keeping freed memory (src/allocator.py)
    from src.allocator import keep_freed_memory
    keep_freed_memory()


def build_parser(describe_all: bool = True) -> argparse.ArgumentParser:
    epilog = ""
    if describe_all:
        from src.safety.constitutional.config_utils import describe_options
        from src.safety.constitutional.pipeline import PipelineConfig
        epilog = ("Every option below can be set in a YAML file (--config) or with --set section.name=value:\n"
                  + "\n".join(describe_options(PipelineConfig)))
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default",
                        help="smoke (tiny random model, seconds), default (SmolLM2-135M on CPU, about an hour on 2 cores), "
                             "full (sizes for a GPU); presets live in configs/<name>.yaml")
    parser.add_argument("--config", help="a YAML file whose options override the preset")
    parser.add_argument("--model", help="'default' (SmolLM2-135M-Instruct) or a local Hugging Face model folder")
    parser.add_argument("--constitution", help="constitution YAML (default: data/constitution.yaml)")
    parser.add_argument("--judge-model", help="a local chat model folder as the model judge for every stage, instead of "
                             "the base model (adds 'judge' to the evaluators; e.g. a 7B instruct model on a GPU); "
                             "its prompts and weight: the constitution's judge: block")
    parser.add_argument("--guard-model", help="a local sequence-classification folder (guard classifier or reward "
                             "model) judging the principles that list 'guard'; labels: the constitution's guard: block")
    parser.add_argument("--output-dir", help="run folder (rerun with the same folder to resume)")
    parser.add_argument("--stages", help="comma-separated subset of: sft,reward,rl,evaluate")
    parser.add_argument("--rl-algorithm", help="stage-3 algorithm: ppo (default), grpo, rloo, reinforce, or dpo (DPO on stage 2's "
                             "preference pairs instead of RL against the reward model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument("--dtype", help="weights: float32 (default), bfloat16, float16")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                        help="matmuls: auto (default: bf16 on CUDA and on CPUs with native bf16, else fp32), bf16, fp32")
    parser.add_argument("--seed", type=int, help="seed for every random choice of the run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        help="override any option listed below, e.g. --set rl.steps=40 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def main(argv=None) -> int:
    describe = argv is None and any(a in ("-h", "--help") for a in sys.argv[1:])
    args = build_parser(describe_all=describe).parse_args(argv)
    from src.models import configure_threads
    configure_threads()  # $CAI_NUM_THREADS, else adaptive: the cores other processes leave free (src/models/threads.py)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from src.safety.constitutional import distributed as ddp
    from src.safety.constitutional.config_utils import ConfigError
    from src.safety.constitutional.pipeline import Pipeline, load_pipeline_config, print_stage_line

    overrides = list(args.overrides)
    for flag, key in (("model", "model"), ("constitution", "constitution"), ("output_dir", "output_dir"),
                      ("judge_model", "judge_model"), ("guard_model", "guard_model"),
                      ("rl_algorithm", "rl.algorithm"), ("device", "device"), ("dtype", "dtype"),
                      ("precision", "precision"),
                      ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    try:
        config = load_pipeline_config(args.preset, args.config, overrides)
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
              f"device {pipeline.device}{ranks})")
    try:
        pipeline.run(on_stage=print_stage_line if main_rank else None)
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        ddp.destroy_distributed()
    report = pipeline.run_dir / "report.md"
    if main_rank and report.is_file():
        print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
