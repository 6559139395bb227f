"""The benchmark runs and prints well-formed JSON lines (no timing assertions: timings are the point)."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


@pytest.mark.slow
def test_generation_section_prints_expected_fields_and_a_failing_section_is_isolated(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    def broken_section(b):
        raise RuntimeError("broken on purpose")
        yield  # pragma: no cover

    monkeypatch.setitem(benchmark.SECTION_FNS, "reward", broken_section)
    out_file = tmp_path / "bench.jsonl"
    threads = torch.get_num_threads()
    try:
        code = benchmark.main(["--only", "reward,generation,pipeline,shared", "--model", str(tiny_model_dir), "--small",
                               "--repeats", "1", "--threads", "1", "--output", str(out_file)])
    finally:
        torch.set_num_threads(threads)  # main() configures threads for the whole process
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == lines

    # the broken section reports its error; the others still run
    assert {"section": "reward", "error": "RuntimeError: broken on purpose"} in lines
    by_section = {}
    for line in lines:
        by_section.setdefault(line["section"], []).append(line)
    assert set(by_section) == {"machine", "matmul", "generation", "reward", "pipeline", "shared"}
    assert by_section["machine"][0]["threads"] == 1
    assert by_section["matmul"][0]["gflops"] > 0
    gen = by_section["generation"]
    assert sorted((g["batch"], g["impl"]) for g in gen) == [(b, impl) for b in (1, 8, 32) for impl in ("ours", "ours_int8")]
    matmul = by_section["matmul"][0]
    assert matmul["read_gb_per_s"] > 0
    for g in gen:
        for key in ("tokens_per_s", "tokens_per_cpu_s", "seconds_median", "peak_mem_mb", "mfu", "mfu_cpu_time",
                    "params_for_flops"):
            assert g[key] > 0, (key, g)
        assert g["answer_tokens"] >= g["batch"]
        if g["impl"] == "ours":  # the roofline: weights read once per step, or the matmul rate
            memory = g["batch"] * matmul["read_gb_per_s"] * 1e9 / g["weight_bytes"]
            compute = matmul["gflops"] * 1e9 / (2 * g["params_for_flops"])
            assert g["bound_tokens_per_s"] == pytest.approx(min(memory, compute), rel=1e-3)
            assert g["bound_kind"] == ("memory" if memory <= compute else "compute")
            assert g["fraction_of_bound"] == pytest.approx(g["tokens_per_s"] / g["bound_tokens_per_s"], rel=1e-3)
    # the whole pipeline, stage by stage: every stage ran (none skipped) and the stages add up to the total
    stages = {p["stage"]: p for p in by_section["pipeline"]}
    assert list(stages) == ["sft", "reward", "rl", "evaluate", "total"]
    assert all(p["seconds"] > 0 for p in stages.values())
    assert sum(stages[s]["seconds"] for s in ("sft", "reward", "rl", "evaluate")) <= stages["total"]["seconds"] + 0.5
    # the busy-machine section: each thread mode alone and beside a competing process, in child processes
    shared = [(r["threads"], r["other_process"]) for r in by_section["shared"]]
    assert shared == [("fixed", False), ("fixed", True), ("adaptive", False), ("adaptive", True)]
    for r in by_section["shared"]:
        assert r["step_s"] > 0 and all(1 <= n <= os.cpu_count() for n in r["threads_used"])
        assert ("slowdown_vs_alone" in r) == r["other_process"]


def test_unknown_section_is_rejected(capsys):
    import pytest
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "generation,warp-drive"])
    assert "warp-drive" in capsys.readouterr().err
