"""The benchmark rows and the results.md writer (benchmarks/benchlib.py); bench_gpu only as a CPU smoke run."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import benchlib as B


def test_targets_are_judged_against_the_ratio():
    assert B.judge(2.5, ">= 2.0") is True
    assert B.judge(1.5, ">= 2.0") is False
    assert B.judge(1.05, "<= 1.10") is True
    assert B.judge(0.5, "< 1.0") is True
    assert B.judge(1.0, "report") is None
    assert B.judge(None, ">= 1") is None
    assert B.judge(float("nan"), ">= 1") is None
    assert B.met_of(B.row("x", "1", "2", 0.5, ">= 0.9", met=True)) is True  # an explicit verdict wins


def test_rows_need_every_key_and_text_fields():
    good = B.row("what", "10 img/s", "20 img/s", 0.5, ">= 0.9", "why")
    B.check_row(good)
    assert set(B.ROW_KEYS) <= set(good)
    with pytest.raises(ValueError, match="lacks"):
        B.check_row({k: v for k, v in good.items() if k != "target"})
    with pytest.raises(ValueError, match="ratio"):
        B.check_row(dict(good, ratio="fast"))


def test_results_file_has_header_table_sections_and_shortfalls(tmp_path):
    rows = [
        B.row("a | b", "10 img/s", "20 img/s", 0.5, ">= 0.9", "loader bound", section="Inference"),
        B.row("c", "3 s", "5 s", 0.6, "< 1.0", section="Blend"),
        B.row("d", "not measured on CPU", "—", None, "report", "needs CUDA", section="Blend"),
    ]
    info = {"date": "2026-01-01 00:00", "CPU": "Test CPU", "GPU": "none", "versions": "torch x, timm y"}
    text = B.write_results(tmp_path / "results.md", rows, info, {"Notes": "text"}, {"infer": 12.3})
    assert (tmp_path / "results.md").read_text() == text
    for part in ("- **CPU**: Test CPU", "- **versions**: torch x, timm y", "## Inference", "## Blend", "## Notes", "## Time per benchmark"):
        assert part in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| what | measured | reference | ratio | target | met? | note |"
    assert "| a \\| b | 10 img/s | 20 img/s | 0.5 | >= 0.9 | **no** | loader bound |" in table
    assert "| c | 3 s | 5 s | 0.6 | < 1.0 | yes |  |" in table
    assert not any(line.startswith("| d |") for line in table)  # every table row has a measured ratio
    assert "## Not measured in this run\n\n- **d** (not measured on CPU): needs CUDA" in text
    short = text.split("## Rows that miss their target")[1].split("##")[0]
    assert "**a | b** (0.5 vs >= 0.9): loader bound" in short and "**c**" not in short


def test_bench_gpu_without_cuda_reports_one_row_and_measures_nothing():
    import bench_gpu

    rows = bench_gpu.run(quick=True)
    assert len(rows) == 1 and rows[0]["ratio"] is None and rows[0]["measured"] == "no CUDA device in this run"
    B.check_row(rows[0])


@pytest.mark.slow
def test_bench_gpu_comparison_runs_on_the_cpu():
    """The recipe's step (per_rank head, context [1, 3] with attention, clipping, EMA) and timm's loops, shrunk to 32 px:
    the code a GPU run executes, at fp32 (the CPU's precision); fp16 and bf16 need the GPU."""
    import bench_gpu
    import torch

    small = ["model.backbone=tf_efficientnet_lite0", "model.img_size=32", "train.batch_size=4", "train.eval_batch_size=4"]
    rows = bench_gpu.compare(torch.device("cpu"), quick=True, overrides=small, timing=(1, 1))
    assert len(rows) == 2 and all(r["ratio"] > 0 for r in rows)
    assert "fp32" in rows[0]["what"] and "per_rank" in rows[0]["what"] and "['1', '3']" in rows[0]["what"]
    for r in rows:
        B.check_row(r)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["matanet", "twostream"])
def test_bench_gpu_covers_the_new_recipes_on_the_cpu(name):
    """Issue 28's recipes at tiny shapes: views, view backbone, fusion, checkpointing and accumulation run, with the memory
    estimate beside the train row."""
    import bench_gpu
    import torch

    rows = bench_gpu.compare(torch.device("cpu"), quick=True, overrides=bench_gpu.SMOKE[name], timing=(1, 1),
                             path=bench_gpu.RECIPES[name])
    assert len(rows) == 2 and all(r["ratio"] > 0 for r in rows)
    assert bench_gpu.RECIPES[name].split("/")[-1] in rows[0]["what"] and "estimate (lib.doctor.memory)" in rows[0]["note"]
    assert ("cross_attention" in rows[0]["what"] and "checkpointing" in rows[0]["what"]) if name == "matanet" else \
        ("entropy_gate" in rows[0]["what"] and "on ['full']" in rows[0]["what"])
    for r in rows:
        B.check_row(r)
