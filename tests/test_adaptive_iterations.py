"""`--iterations auto` (golf_dist.inference.engine.restore): after F, G runs on each image until its update's mean
absolute change is below the tolerance, or the maximum count; per image in a batch; on tiles and ensembles decided
on the whole image the user gets; bad values refused naming the flag (exit 2) on launch/deblur.py and
launch/evaluate.py; reported by the evaluation and by deblur; the MLflow model's config takes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_config
from PIL import Image
from random_model import write_random_model

from golf_dist.checkpoints import save_weights
from golf_dist.errors import ConfigError
from golf_dist.inference.engine import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_TOLERANCE,
    AutoIterations,
    parse_iterations,
    restore,
    restore_iterates,
)
from golf_dist.models import f_net, g_net


def _networks(seed: int = 0):
    """F and G with random weights (G changes an image at every iteration), in eval mode."""
    torch.manual_seed(seed)
    return f_net(zero_init_last=False).eval(), g_net(zero_init_last=False).eval()


def _changes(iterates: list[torch.Tensor]) -> list[float]:
    """Each G iteration's mean absolute change of the (single) image: the quantity auto compares."""
    return [(b - a).abs().mean().item() for a, b in zip(iterates, iterates[1:])]


def _first_below(changes: list[float], tolerance: float, maximum: int) -> int:
    """The G iterations auto should run: the first whose change is below `tolerance`, else `maximum`."""
    return next((k for k, c in enumerate(changes[:maximum], 1) if c < tolerance), maximum)


class CountingG(torch.nn.Module):
    """A real G that records the batch size of every call, to show which images G ran on."""

    def __init__(self, g: torch.nn.Module):
        super().__init__()
        self.g, self.batches = g, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.g(x)


def test_auto_stops_at_its_maximum_when_g_keeps_changing_the_image():
    f, g = _networks()
    blur = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    restored = restore(f, g, blur, AutoIterations(tolerance=1e-6, maximum=5))
    assert restored.used.tolist() == [5] and len(restored.iterates) == 6
    assert min(_changes(restored.iterates)) > 1e-6  # it did keep changing: the maximum stopped it
    for a, b in zip(restored.iterates, restore_iterates(f, g, blur, 5)):
        assert torch.equal(a, b)  # the same iterates a fixed count of 5 gives


@pytest.mark.parametrize("tile, ensemble", [(None, "x1"), (24, "x1"), (None, "x8"), (24, "x4")])
def test_an_identity_g_stops_after_one_iteration(tile, ensemble):
    """g_net's last convolution starts at zero: G(x) = x + 0, a real G network that is the identity."""
    f, _ = _networks()
    identity = g_net().eval()
    blur = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    restored = restore(f, identity, blur, AutoIterations(tolerance=1e-3, maximum=8), tile, 8, ensemble)
    assert restored.used.tolist() == [1, 1] and len(restored.iterates) == 2
    assert torch.equal(restored.iterates[0], restored.iterates[1])


def test_each_image_of_a_batch_stops_on_its_own():
    """Two images that converge at different iterations: each stops at its own, keeps its estimate from then on,
    G runs only on the image still going, and each gets what it gets alone."""
    f, g = _networks(3)
    g.tail.weight.data *= 0.2  # a G whose updates shrink: a tolerance between the images' curves separates them
    rng = torch.Generator().manual_seed(4)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 36, 44, generator=rng), 5, 1, 2)
    batch = torch.cat([smooth, torch.rand(1, 3, 36, 44, generator=rng)])
    maximum = 6
    alone = [restore_iterates(f, g, batch[i : i + 1], maximum) for i in range(2)]
    curves = [_changes(iterates) for iterates in alone]
    # a tolerance where the two images stop at different iterations
    tolerance = next(
        t for t in sorted(curves[0] + curves[1]) if len({_first_below(c, t * 1.0001, maximum) for c in curves}) == 2
    )
    tolerance *= 1.0001
    expected = [_first_below(c, tolerance, maximum) for c in curves]

    counting = CountingG(g)
    restored = restore(f, counting, batch, AutoIterations(tolerance, maximum))
    assert restored.used.tolist() == expected
    first, last = sorted(expected)
    assert counting.batches == [2] * first + [1] * (last - first)  # the stopped image is not run again
    assert len(restored.iterates) == last + 1
    for i, stop in enumerate(expected):
        for k, estimate in enumerate(restored.iterates):
            torch.testing.assert_close(estimate[i], alone[i][min(k, stop)][0], atol=1e-5, rtol=0)
        for estimate in restored.iterates[stop + 1 :]:
            assert torch.equal(estimate[i], restored.iterates[stop][i])  # held exactly once stopped


def _contracting_g(factor: float = 0.5) -> torch.nn.Module:
    """A G that converges: a 1x1 convolution x -> factor * x + (1 - factor) * 0.5, each update `factor` times the
    last, so a tolerance between two updates stops it at a known iteration."""
    g = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        g.weight.copy_(factor * torch.eye(3)[:, :, None, None])
        g.bias.fill_((1 - factor) * 0.5)
    return g.eval()


@pytest.mark.parametrize("tile, ensemble", [(32, "x1"), (None, "x4"), (32, "x2")])
def test_on_tiles_and_ensembles_the_stop_is_decided_on_the_whole_image(tile, ensemble):
    """Per image means the whole image the user gets: the tiles blended, the ensemble's transforms averaged. Auto
    gives the same iterates as a fixed count on the same tiles and ensemble, cut at the first iteration whose
    whole-image change is below the tolerance, every tile and transform stopping together."""
    f, _ = _networks(5)
    g = _contracting_g()
    blur = torch.rand(1, 3, 56, 72, generator=torch.Generator().manual_seed(6))
    maximum = 6
    fixed = restore_iterates(f, g, blur, maximum, tile, 12, ensemble)
    changes = _changes(fixed)
    tolerance = (changes[1] * changes[2]) ** 0.5  # between the second and the third update: stops at the third
    assert _first_below(changes, tolerance, maximum) == 3
    restored = restore(f, g, blur, AutoIterations(tolerance, maximum), tile, 12, ensemble)
    assert restored.used.tolist() == [3] and len(restored.iterates) == 4
    for a, b in zip(restored.iterates, fixed):
        assert torch.equal(a, b)


def test_bad_values_are_config_errors_naming_the_key():
    assert parse_iterations("auto") == AutoIterations()
    assert parse_iterations(" AUTO ", "2e-3", "5") == AutoIterations(2e-3, 5)
    assert parse_iterations("4") == 4 and parse_iterations(0) == 0
    flags = ("the model's iterations", "the model's tolerance", "the model's max_iterations")
    for args, named in [
        (("auto", 0), "the model's tolerance must be above 0"),
        (("auto", "nan"), "the model's tolerance must be above 0"),
        (("auto", "soon"), "the model's tolerance must be a number"),
        (("auto", None, 0), "the model's max_iterations must be an integer from 1 to"),
        (("auto", None, 2.5), "the model's max_iterations must be an integer from 1 to"),
        (("twice",), "the model's iterations must be an integer from 0 to 100 or 'auto'"),
        ((3, 1e-3), "the model's tolerance applies only to the model's iterations auto"),
        ((3, None, 4), "the model's max_iterations applies only to the model's iterations auto"),
    ]:
        with pytest.raises(ConfigError, match=named):
            parse_iterations(*args, flags=flags)


# ---- through the command lines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def identity_model_dir(tmp_path_factory):
    """A training output folder whose G is the identity (its last convolution zero, as g_net starts)."""
    folder = write_random_model(tmp_path_factory.mktemp("identity"))
    save_weights(g_net().state_dict(), folder / "g.safetensors")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--iterations", "twice"], "--iterations"),
        (["--iterations", "2.5"], "--iterations"),
        (["--iterations", "auto", "--tolerance", "0"], "--tolerance"),
        (["--iterations", "auto", "--tolerance=-1e-3"], "--tolerance"),
        (["--iterations", "auto", "--max-iterations", "0"], "--max-iterations"),
        (["--iterations", "auto", "--max-iterations", "101"], "--max-iterations"),
        (["--iterations", "3", "--tolerance", "1e-3"], "--tolerance"),
        (["--max-iterations", "4"], "--max-iterations"),
    ],
)
def test_deblur_and_evaluate_refuse_bad_values_naming_the_flag(model_dir, photos, tmp_path, args, flag):
    """Exit 2 naming the flag, before the model loads, nothing written."""
    out = tmp_path / "out"
    for proc in (
        run_cli("launch/deblur.py", "--output-dir", model_dir, photos, "--out", out, *args),
        run_cli("launch/evaluate.py", "--output-dir", model_dir, *args),
    ):
        assert proc.returncode == 2 and f"error: {flag} " in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not out.exists() and not (model_dir / "evaluation.json").exists()


def test_deblur_auto_prints_the_iterations_each_image_used(model_dir, identity_model_dir, photos, tmp_path):
    keeps_changing = run_cli(
        "launch/deblur.py",
        "--output-dir",
        model_dir,
        photos,
        "--out",
        tmp_path / "a",
        "--iterations",
        "auto",
        "--tolerance",
        "1e-6",
        "--max-iterations",
        "3",
        check=True,
    )
    identity = run_cli(
        "launch/deblur.py",
        "--output-dir",
        identity_model_dir,
        photos,
        "--out",
        tmp_path / "b",
        "--iterations",
        "auto",
        check=True,
    )
    for proc, out, line in ((keeps_changing, "a", "3 G iterations"), (identity, "b", "1 G iteration")):
        for name in ("a", "b"):
            assert f"{tmp_path / out / photos.name / name}.png: {line}\n" in proc.stdout, proc.stdout
    # the output is F + 3 G, as a fixed count of 3 writes it
    run_cli("launch/deblur.py", "--output-dir", model_dir, photos, "--out", tmp_path / "c", check=True)
    for name in ("a", "b"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "a" / photos.name / f"{name}.png")),
            np.asarray(Image.open(tmp_path / "c" / photos.name / f"{name}.png")),
        )


def test_evaluate_auto_reports_the_iterations_used(identity_model_dir, model_dir, shards, tmp_path):
    """evaluation.json, the printed summary and the MLflow run say how many G iterations the pairs used."""
    import mlflow

    results = {}
    for name, weights, extra in (
        ("identity", identity_model_dir, []),
        ("changing", model_dir, ["--tolerance", "1e-6", "--max-iterations", "3"]),
    ):
        folder = Path(shutil.copytree(weights, tmp_path / name / "out"))  # evaluate writes its results there
        cfg = write_config(tmp_path / name / "c.yaml", shards, folder)
        proc = run_cli(
            "launch/evaluate.py", "--output-dir", folder, "--config", cfg, "--iterations", "auto", *extra, check=True
        )
        results[name] = (json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout, cfg.parent / "mlflow.db")
        assert (
            json.loads((folder / "evaluation.json").read_text())["iterations_used"]
            == results[name][0]["iterations_used"]
        )

    identity, printed, db = results["identity"]
    assert identity["iterations"] == "auto" and identity["tolerance"] == DEFAULT_TOLERANCE
    assert identity["max_iterations"] == DEFAULT_MAX_ITERATIONS
    assert identity["iterations_used"] == {"mean": 1.0, "min": 1, "max": 1, "counts": {"1": 4}}
    curve = identity["psnr_per_iteration"]
    assert len(curve) == DEFAULT_MAX_ITERATIONS + 1 and len(set(curve[1:])) == 1
    summary = f"(auto, tolerance {DEFAULT_TOLERANCE:g}, at most {DEFAULT_MAX_ITERATIONS}): mean 1.00, 1 to 1"
    assert f"G iterations used {summary} (pairs per count: 1: 4)" in printed
    changing = results["changing"][0]
    assert changing["iterations_used"] == {"mean": 3.0, "min": 3, "max": 3, "counts": {"3": 4}}
    assert len(changing["psnr_per_iteration"]) == 4

    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    run = client.get_run(identity["mlflow_run_id"])
    assert run.data.params["iterations"] == "auto" and run.data.params["max_iterations"] == str(DEFAULT_MAX_ITERATIONS)
    assert run.data.metrics["test_iterations_used_mean"] == 1.0 and run.data.metrics["test_iterations_used_max"] == 1
    by_count = client.get_metric_history(run.info.run_id, "test_pairs_by_iterations_used")
    assert [(m.step, m.value) for m in by_count] == [(1, 4.0)]


# ---- the MLflow model ----------------------------------------------------------------------------------------


def _loaded_model(folder, config):
    """GolfModel as MLflow loads it (load_context with the logged artifacts and model_config), without a store."""
    from mlflow.pyfunc import PythonModelContext

    from golf_dist.inference.mlflow_model import GolfModel

    model = GolfModel()
    artifacts = {"f": str(folder / "f.safetensors"), "g": str(folder / "g.safetensors")}
    model.load_context(PythonModelContext(artifacts=artifacts, model_config=config))
    return model


def test_the_mlflow_models_config_takes_auto(identity_model_dir, model_dir):
    import pandas as pd

    pixels = np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    request = pd.DataFrame({"image": [pixels]})
    auto = _loaded_model(model_dir, {"iterations": "auto", "tolerance": 1e-6, "max_iterations": 2})
    assert auto.iterations == AutoIterations(1e-6, 2)
    fixed = _loaded_model(model_dir, {"iterations": 2})
    assert np.array_equal(auto.predict(None, request)["image"][0], fixed.predict(None, request)["image"][0])
    identity = _loaded_model(identity_model_dir, {"iterations": "auto"})
    assert identity.iterations == AutoIterations()
    f_alone = _loaded_model(identity_model_dir, {"iterations": 0})
    assert np.array_equal(identity.predict(None, request)["image"][0], f_alone.predict(None, request)["image"][0])
    with pytest.raises(ConfigError, match="the model's tolerance must be above 0"):
        _loaded_model(model_dir, {"iterations": "auto", "tolerance": 0})
    with pytest.raises(ConfigError, match="the model's max_iterations applies only to the model's iterations auto"):
        _loaded_model(model_dir, {"iterations": 3, "max_iterations": 4})


@pytest.mark.slow
def test_a_logged_model_with_auto_loads_and_predicts(model_dir, tmp_path):
    """log_model writes auto into the model's config and mlflow.pyfunc.load_model runs it."""
    import mlflow
    import pandas as pd

    from golf_dist.inference.mlflow_model import log_model
    from golf_dist.tracking import fluent_tracking_uri

    with fluent_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        with mlflow.start_run():
            info = log_model(model_dir, AutoIterations(1e-6, 2))
        loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.metadata.flavors["python_function"]["config"] == {
        "iterations": "auto",
        "tolerance": 1e-6,
        "max_iterations": 2,
        "ensemble": "x1",
    }
    pixels = np.random.default_rng(2).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    fixed = _loaded_model(model_dir, {"iterations": 2}).predict(None, pd.DataFrame({"image": [pixels]}))
    assert np.array_equal(loaded.predict(pd.DataFrame({"image": [pixels]}))["image"][0], fixed["image"][0])


@pytest.mark.slow
def test_the_onnx_engine_runs_auto_step_by_step_as_pytorch_does(model_dir, photos, tmp_path):
    """--engine onnxruntime runs G one iteration at a time, so auto stops where PyTorch stops."""
    pytest.importorskip("onnxruntime")
    run_cli("launch/export.py", "--output-dir", model_dir, "--onnx", tmp_path / "onnx", check=True)
    auto = ["--iterations", "auto", "--tolerance", "1e-6", "--max-iterations", "2"]
    by_engine = {
        engine: run_cli(
            "launch/deblur.py",
            "--output-dir",
            folder,
            photos,
            "--out",
            tmp_path / engine,
            "--engine",
            engine,
            *auto,
            check=True,
        )
        for engine, folder in (("torch", model_dir), ("onnxruntime", tmp_path / "onnx"))
    }
    for engine, proc in by_engine.items():
        for name in ("a", "b"):
            assert f"{tmp_path / engine / photos.name / name}.png: 2 G iterations\n" in proc.stdout, proc.stdout
            pixels = np.asarray(Image.open(tmp_path / engine / photos.name / f"{name}.png"), dtype=int)
            reference = np.asarray(Image.open(tmp_path / "torch" / photos.name / f"{name}.png"), dtype=int)
            assert np.abs(pixels - reference).max() <= 1  # the graphs match PyTorch within 1e-4 before rounding
