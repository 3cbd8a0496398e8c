"""launch/gpu_check.py --device cpu: the GPU acceptance check's table at tiny sizes, every row with a status."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

ROWS = [
    f"train_{stage} {column}"
    for stage in ("f", "g")
    for column in ("eager", "compile", "channels_last", "fused_norm", "fused_adam", "tf32", "cuda_graphs")
] + [
    "bf16 vs fp32",
    "memory g unroll 8",
    "memory g unroll 32",
    "dali vs torch loader",
    "evaluation",
    "infer 256",
    "deblur 1280x720",
    "onnxruntime",
]


@pytest.mark.slow
def test_gpu_check_on_a_cpu_writes_every_row_with_its_status(shards, tmp_path):
    proc = run_cli("launch/gpu_check.py", "--device", "cpu", "--shards", shards, "--out", tmp_path, check=True)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == ROWS
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row  # nothing fails on a CPU
        assert (row["status"] == "ok") == ("why" not in row), row
        assert f"| {row['row']} | {row['status']}" in proc.stdout
    # what a CPU runs: eager and compiled/channels_last steps equal to eager, bf16 close to fp32, the same crops
    for stage in ("f", "g"):
        for column in ("eager", "compile", "channels_last"):
            row = rows[f"train_{stage} {column}"]
            assert row["status"] == "ok" and row["crops_per_s"] > 0 and row["relative_difference_vs_eager"] < 1e-2
        assert rows[f"train_{stage} tf32"]["why"] == "tf32 needs CUDA"
    assert 20 < rows["bf16 vs fp32"]["psnr_bf16_vs_fp32_db"] < 80
    assert rows["dali vs torch loader"]["same_crops"] is True
    assert rows["evaluation"]["pairs"] == 2 and rows["evaluation"]["speed_fallback"] == []
    assert rows["deblur 1280x720"]["size"] == "72x40" and rows["deblur 1280x720"]["ms"] > 0
    assert "not judged on a CPU" in rows["train_f eager"]["goal"]
    assert rows["memory g unroll 8"]["status"] == "skipped"


def test_the_rows_and_their_table_without_a_gpu(tmp_path):
    """The fast loop's unit of golf_dist.perf.gpu_check: the rows it would run, those that need CUDA or shards skipped
    with the reason, the goals judged only on CUDA, and the Markdown table."""
    from golf_dist.perf import gpu_check

    rows = dict(gpu_check.rows_to_run("cpu", gpu_check.SIZES["cpu"], None, tmp_path))
    assert {"train_f eager", "train_g eager", "dali vs torch loader", "onnxruntime"} <= set(rows)
    for name, why in (("train_f cuda_graphs", "CUDA"), ("dali vs torch loader", "--shards")):
        with pytest.raises(gpu_check._Skip, match=why):
            rows[name]()
    assert "not judged on a CPU" in gpu_check._judge("infer 256", {"ms": 3.0}, "cpu")
    assert gpu_check._judge("infer 256", {"ms": 0.5}, "cuda").startswith("met")
    report = {
        "device": "cpu",
        "torch": "x",
        "seconds": 1.0,
        "rows": [
            {"row": "infer 256", "status": "ok", "ms": 3.0, "seconds": 0.1},
            {"row": "onnxruntime", "status": "skipped", "why": "no onnx", "seconds": 0.0},
        ],
    }
    assert "| infer 256 | ok | ms 3.0 |" in gpu_check.table(report) and "skipped: no onnx" in gpu_check.table(report)
