"""Where a trained model goes next: self-ensembled inference, ONNX graphs run by ONNX Runtime, an MLflow
pyfunc model that `mlflow models predict` runs, the experiment kind the MLflow UI opens on, and DeepSpeed
kept out of runs that do not use it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from golf_dist.errors import ConfigError
from golf_dist.inference.ensemble import ENSEMBLES, _forward, _inverse, ensemble_iterates
from golf_dist.models import f_net, golf_iterates
from golf_dist.tracking import fluent_tracking_uri, resolve_uri

# ---- self-ensemble ------------------------------------------------------------------------------------


def test_each_transform_is_undone_exactly():
    x = torch.rand(1, 3, 5, 7)
    for mode, transforms in ENSEMBLES.items():
        assert len(transforms) == int(mode[1:]) and len(set(transforms)) == len(transforms)
        for transform in transforms:
            assert torch.equal(_inverse(_forward(x, *transform), *transform), x)


def test_ensemble_x1_is_the_plain_restoration_and_x8_keeps_the_shape():
    torch.manual_seed(0)
    f = f_net(zero_init_last=False).eval()  # not flip-equivariant: x8 must differ from x1
    blur = torch.rand(1, 3, 20, 28)
    plain = golf_iterates(f, None, blur, 0)
    x1 = ensemble_iterates(lambda image: golf_iterates(f, None, image, 0), blur, "x1")
    assert torch.equal(x1[0], plain[0])
    x8 = ensemble_iterates(lambda image: golf_iterates(f, None, image, 0), blur, "x8")
    assert x8[0].shape == blur.shape and not torch.allclose(x8[0], plain[0], atol=1e-6)
    # the average of the 8 outputs, each mapped back
    by_hand = sum(_inverse(f(_forward(blur, *t)), *t) for t in ENSEMBLES["x8"]) / 8
    assert torch.allclose(x8[0], by_hand, atol=1e-6)


def test_an_unknown_ensemble_is_refused():
    with pytest.raises(ConfigError, match="--ensemble"):
        ensemble_iterates(lambda image: [image], torch.rand(1, 3, 4, 4), "x3")


# ---- ONNX ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_dir(small_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    proc = run_cli("launch/export.py", "--output-dir", small_run["out"], "--onnx", folder, check=True)
    written = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {p.name for p in folder.iterdir()} == {"f.onnx", "g.onnx", "onnx.json"}  # no temporaries left
    assert all(entry["max_abs_difference"] <= 1e-4 for entry in written.values())
    return folder


def _test_frame(shards):
    from golf_dist.data.torch_loader import ShardPairs, full_frame_loader

    blur, _, _, _ = next(iter(full_frame_loader(ShardPairs(str(shards), "test"), 0, 1, limit=1, num_workers=0)))
    return blur.unsqueeze(0)


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch_on_random_and_real_images(small_run, onnx_dir, shards):
    from golf_dist.inference.engine import load_onnx, load_trained

    f, g = load_trained(small_run["out"], torch.device("cpu"), 3)
    f_onnx, g_onnx = load_onnx(onnx_dir, 3)
    for image in (torch.rand(1, 3, 41, 67, generator=torch.Generator().manual_seed(1)), _test_frame(shards)):
        with torch.no_grad():
            expected = golf_iterates(f, g, image, 3)
        for a, b in zip(golf_iterates(f_onnx, g_onnx, image, 3), expected):
            assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_deblur_with_onnxruntime(onnx_dir, tmp_path):
    src = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(src)
    run_cli(
        "launch/deblur.py",
        "--output-dir",
        onnx_dir,
        src,
        "--out",
        tmp_path / "out",
        "--engine",
        "onnxruntime",
        "--ensemble",
        "x2",
        check=True,
    )
    assert Image.open(tmp_path / "out" / "photo.png").size == (44, 30)
    # no graph there: a clear error naming the file, nothing written
    bad = run_cli(
        "launch/deblur.py", "--output-dir", tmp_path, src, "--out", tmp_path / "bad", "--engine", "onnxruntime"
    )
    assert bad.returncode == 1 and str(tmp_path / "f.onnx") in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


# ---- MLflow ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_registered_mlflow_model_predicts_what_deblur_writes(small_run, tmp_path):
    """evaluate --ensemble x2 --register logs F + G as a pyfunc model run as evaluated and registers it;
    `mlflow models predict` on it gives the pixels `launch/deblur.py --ensemble x2` writes from an array; it
    reads a `path` under --path-root only (tests/test_model_inputs.py: the root's checks; no root, no `path`)."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from golf_dist.inference.deblur import deblur_files

    out, db = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    (out / "g").mkdir(parents=True)
    for name in ("f.safetensors", "g.safetensors", "g/config.yaml"):
        shutil.copy(small_run["out"] / name, out / name)
    # --path-root with no --register, or not a folder: refused before any work
    for flags in (["--path-root", str(tmp_path)], ["--register", "golf-small", "--path-root", str(tmp_path / "none")]):
        refused = run_cli("launch/evaluate.py", "--output-dir", out, *flags, f"tracking.uri={db}")
        assert refused.returncode == 2 and "--path-root" in refused.stderr, refused.stderr[-2000:]
    served = tmp_path / "served"
    served.mkdir()
    proc = run_cli(
        "launch/evaluate.py",
        "--output-dir",
        out,
        "--iterations",
        "2",
        "--limit",
        "1",
        "--ensemble",
        "x2",
        "--register",
        "golf-small",
        "--path-root",
        served,
        f"tracking.uri={db}",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ensemble"] == "x2" and result["pairs"] == 1 and result["seconds_per_pair"] > 0
    client = MlflowClient(tracking_uri=db)
    version = client.get_model_version("golf-small", result["registered"]["version"])
    assert float(version.tags["test_psnr"]) == pytest.approx(result["psnr"], abs=1e-4)
    experiment = client.get_experiment_by_name("golf-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    src = tmp_path / "photo.png"
    image = np.random.default_rng(2).integers(0, 255, (24, 36, 3), dtype=np.uint8)
    Image.fromarray(image).save(src)
    deblur_files(out, [str(src)], tmp_path / "deblurred", iterations=2, device="cpu", ensemble="x2")
    expected = np.asarray(Image.open(tmp_path / "deblurred" / "photo.png"))
    request, response = tmp_path / "request.json", tmp_path / "predictions.json"
    request.write_text(json.dumps({"dataframe_records": [{"image": image.tolist()}]}))
    predict = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "predict",
            "-m",
            "models:/golf-small/1",
            "-i",
            str(request),
            "-t",
            "json",
            "--env-manager",
            "local",
            "-o",
            str(response),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**_env_without_uri(), "MLFLOW_TRACKING_URI": db},
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = json.loads(response.read_text())["predictions"]
    assert len(rows) == 1 and np.array_equal(np.asarray(rows[0]["image"], dtype=np.uint8), expected)
    with fluent_tracking_uri(db):
        model = mlflow.pyfunc.load_model("models:/golf-small/1")
    # registered with --path-root: a file under it is read, one outside it is not
    shutil.copy(src, served / "photo.png")
    assert np.array_equal(model.predict(pd.DataFrame({"path": ["photo.png"]}))["image"][0], expected)
    with pytest.raises(Exception, match="no image at 'path'"):
        model.predict(pd.DataFrame({"path": [str(src)]}))
    with pytest.raises(Exception, match="at least 4 pixels"):
        model.predict(pd.DataFrame({"image": [np.zeros((3, 8, 3), dtype=np.uint8)]}))


@pytest.mark.parametrize("user_uri", [None, "sqlite:////srv/team/mlflow.db"])
def test_fluent_tracking_uri_puts_mlflow_tracking_uri_back(monkeypatch, tmp_path, user_uri):
    """register_model points MLflow's fluent API at the evaluation's store for one block; afterwards
    MLFLOW_TRACKING_URI is as the user had it (absent, or their own), so a later run in the same process
    goes where its config (or the user's variable) says, not to the evaluation's store."""
    import mlflow

    if user_uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", user_uri)
    store = f"sqlite:///{tmp_path / 'evaluation.db'}"
    with fluent_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store
    assert os.environ.get("MLFLOW_TRACKING_URI") == user_uri
    config_uri = f"sqlite:///{tmp_path / 'next_run.db'}"
    assert resolve_uri(config_uri) == (user_uri or config_uri)
    if user_uri is not None:
        assert mlflow.get_tracking_uri() == user_uri


def _env_without_uri():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def test_runs_without_deepspeed_do_not_load_it(small_run):
    """DeepSpeed prints "Setting accelerator to CPU" when it is imported: a run that does not use it must not
    import it (train, G training and evaluation of the small run)."""
    for stderr in small_run["stderr"]:
        assert "Setting accelerator" not in stderr and "real_accelerator" not in stderr


def test_export_of_a_folder_without_weights_is_named_and_writes_nothing(tmp_path):
    """The fast loop's unit of golf_dist.inference.export (the ONNX exports themselves run in the slow tests above)."""
    from golf_dist.errors import DataError
    from golf_dist.inference.export import export_onnx

    with pytest.raises(DataError, match=f"no trained F at {tmp_path / 'run' / 'f.safetensors'}"):
        export_onnx(tmp_path / "run", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
