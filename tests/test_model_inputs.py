"""What a trained model takes from its callers, bounded: the MLflow model's `path` column only under the folder
it was logged with (and errors that tell nothing of the server's other files), the pixel limit on its `image`
column, and flags that would run for hours (`--iterations`, `--tile` with `--overlap`) refused naming the flag
before any work, on launch/deblur.py, launch/evaluate.py and the MLflow model alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from mlflow.exceptions import MlflowException
from PIL import Image
from random_model import write_random_model

import golf_dist
from golf_dist.data.formats import MAX_PIXELS
from golf_dist.errors import ConfigError
from golf_dist.inference.engine import MAX_ITERATIONS
from golf_dist.inference.tiling import MAX_TILES, check_tile_count


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def closed_model(model_dir, tmp_path_factory):
    """The model logged without a path root, as `evaluate --register` logs it."""
    return _log_and_load(model_dir, tmp_path_factory.mktemp("closed"))


def _log_and_load(model_dir, tmp_path, **kwargs):
    """log_model into a real sqlite store, then the model as a caller loads it (mlflow.pyfunc.load_model)."""
    import mlflow

    from golf_dist.inference.mlflow_model import log_model
    from golf_dist.tracking import fluent_tracking_uri

    with fluent_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        with mlflow.start_run():
            info = log_model(model_dir, iterations=1, **kwargs)
        return mlflow.pyfunc.load_model(info.model_uri)


@pytest.mark.slow
def test_mlflow_model_reads_paths_only_under_its_root_and_says_nothing_of_other_files(
    model_dir, closed_model, tmp_path, monkeypatch
):
    import pandas as pd

    root, elsewhere = tmp_path / "images", tmp_path / "private"
    root.mkdir(), elsewhere.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "photo.png")
    Image.fromarray(pixels).save(elsewhere / "secret.png")
    (root / "link.png").symlink_to(elsewhere / "secret.png")

    model = _log_and_load(model_dir, tmp_path, path_root=root)
    by_path = model.predict(pd.DataFrame({"path": ["photo.png", str(root / "photo.png")]}))["image"]
    by_pixels = model.predict(pd.DataFrame({"image": [pixels]}))["image"][0]
    assert np.array_equal(by_path[0], by_pixels) and np.array_equal(by_path[1], by_pixels)
    # outside the root, through `..` or a link, or missing: one answer, whether the file exists or not
    answers = set()
    for path in (
        str(elsewhere / "secret.png"),
        "../private/secret.png",
        "link.png",
        str(elsewhere / "none.png"),
        "/etc/passwd",
        "/etc/no-such-file",
    ):
        with pytest.raises(Exception) as refused:
            model.predict(pd.DataFrame({"path": [path]}))
        answers.add(str(refused.value).replace(repr(path), "PATH"))
    assert len(answers) == 1 and "no image at 'path' PATH in the model's image folder" in answers.pop()

    # logged without a root (as `evaluate --register` logs it): no path is read at all
    with pytest.raises(Exception, match="takes no 'path'"):
        closed_model.predict(pd.DataFrame({"path": [str(root / "photo.png")]}))

    # what `mlflow models serve` answers: the message, no traceback naming the server's files
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    monkeypatch.delenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", raising=False)  # init() sets it
    client = TestClient(scoring_server.init(model))
    for path in (str(elsewhere / "secret.png"), "/etc/passwd"):
        answer = client.post("/invocations", json={"dataframe_records": [{"path": path}]})
        assert answer.status_code == 400 and "no image at 'path'" in answer.json()["message"]
        assert "stack_trace" not in answer.json() and str(Path(golf_dist.__file__).parent) not in answer.text


@pytest.mark.slow
def test_mlflow_model_holds_the_image_column_to_the_pixel_limit(closed_model):
    """An `image` over MAX_PIXELS is refused from its shape, before it is converted or run (unbounded, one
    request of it would hold gigabytes of activations); lists are measured as arrays are. The loaded model's
    own predict is called: MLflow's signature check before it walks every value in Python (minutes for an
    image this size), as the server does before calling it."""
    import pandas as pd

    model = closed_model.unwrap_python_model()
    wide = MAX_PIXELS // 4 + 1
    with pytest.raises(MlflowException, match=f"row 0: image of {wide}x4 = {wide * 4} pixels, more than"):
        model.predict(None, pd.DataFrame({"image": [np.zeros((4, wide, 3), dtype=np.uint8)]}))
    rows = [[[0, 0, 0]] * 8] * (MAX_PIXELS // 8 + 1)  # nested lists, as JSON gives them: one row object shared
    with pytest.raises(MlflowException, match=f"image of 8x{MAX_PIXELS // 8 + 1} = .* pixels, more than"):
        model.predict(None, pd.DataFrame({"image": [rows]}))


def test_mlflow_model_refuses_unbounded_iterations(model_dir, tmp_path):
    from golf_dist.inference.mlflow_model import log_model

    with pytest.raises(ConfigError, match=f"iterations must be between 0 and {MAX_ITERATIONS}"):
        log_model(model_dir, iterations=MAX_ITERATIONS + 1)


def test_tile_count_bound():
    check_tile_count(800, 800, 16, 8, "x")  # the smallest tile still covers 800x800
    with pytest.raises(ConfigError, match=r"--tile 16 --overlap 8 cuts x \(4000x3000\) into \d+ tiles, more than"):
        check_tile_count(3000, 4000, 16, 8, "x")
    check_tile_count(3000, 4000, 256, 32, "x")


def test_deblur_and_evaluate_refuse_what_cannot_finish_naming_the_flag(model_dir, tmp_path):
    """Exit 2 naming the flag, before the model loads, nothing written."""
    big = tmp_path / "big.png"
    Image.new("RGB", (1700, 1700), (90, 90, 90)).save(big)  # 1700x1700 in 16-pixel tiles 8 apart: ~45,000
    out = tmp_path / "out"
    refused = {
        "--tile": run_cli(
            "launch/deblur.py", "--output-dir", model_dir, big, "--out", out, "--tile", "16", "--overlap", "8"
        ),
        "--iterations": run_cli(
            "launch/deblur.py", "--output-dir", model_dir, big, "--out", out, "--iterations", str(MAX_ITERATIONS + 1)
        ),
        "--iterations ": run_cli("launch/evaluate.py", "--output-dir", model_dir, "--iterations", "1000000"),
    }
    for flag, proc in refused.items():
        assert proc.returncode == 2 and f"error: {flag.strip()} " in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert f"more than {MAX_TILES}" in refused["--tile"].stderr and not out.exists()


def test_the_models_from_code_file_hands_mlflow_a_golf_model():
    """golf_dist/inference/mlflow_model_code.py is the source MLflow runs when it loads the logged model: importing it
    sets the GolfModel MLflow builds the pyfunc from (the loads themselves run in the slow tests above)."""
    import importlib

    import mlflow.models.model

    from golf_dist.inference.mlflow_model import GolfModel

    try:
        importlib.reload(importlib.import_module("golf_dist.inference.mlflow_model_code"))
        assert isinstance(mlflow.models.model.__mlflow_model__, GolfModel)
    finally:
        mlflow.models.model.__mlflow_model__ = None  # as MLflow leaves it after a load
