"""launch/gpu_check.py --device cpu: the GPU acceptance check's table at tiny sizes, every row with a status."""

from __future__ import annotations

import json

from conftest import run_cli

ROWS = [f"train_{stage} {column}" for stage in ("f", "g") for column in (
    "eager", "compile", "channels_last", "fused_norm", "fused_adam", "tf32", "cuda_graphs")] + [
    "bf16 vs fp32", "memory g unroll 8", "memory g unroll 32", "dali vs torch loader", "evaluation", "infer 256",
    "deblur 1280x720", "onnxruntime"]


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
