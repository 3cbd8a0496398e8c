"""A trained F + G as one MLflow pyfunc model, so `mlflow models predict` and `mlflow models serve` run it
without this project's command lines: `launch/evaluate.py --register NAME` logs it into the evaluation's
run and registers it with its test PSNR as a tag.

Input: a table with one image per row, in the column `image` (an HxWx3 array of 0..255 values, as nested
lists in JSON) or `path` (a PNG or JPEG file under the folder the model was logged with, `path_root`; without
one, the column is refused, so a caller cannot read or probe the server's files); one request gives one of
the two columns (MLflow's JSON parser cannot type an `image` column with empty rows). Every input is held to
golf_dist.data.formats.MAX_PIXELS before it is converted or run. Output: a table with the deblurred
image of each row in the column `image` (HxWx3 uint8), the same pixels `launch/deblur.py` writes. The
weights travel as the safetensors files training exported and this package travels as the model's code,
so the model loads where golf-dist is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from golf_dist.errors import ConfigError, DataError
from golf_dist.inference.engine import MIN_SIDE, AutoIterations, iteration_fields, most_iterations, parse_iterations
from golf_dist.log import get_logger

IMAGE, PATH = "image", "path"
# how the model's config names its G iterations to the user, in errors (golf_dist.inference.engine.parse_iterations)
CONFIG_FLAGS = ("the model's iterations", "the model's tolerance", "the model's max_iterations")
log = get_logger(__name__)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema

    image = Array(Array(Array(DataType.long)))  # HxWx3; rows may differ in size
    return ModelSignature(
        inputs=Schema([ColSpec(image, IMAGE, required=False), ColSpec(DataType.string, PATH, required=False)]),
        outputs=Schema([ColSpec(image, IMAGE)]),
    )


def _row_image(row: pd.Series, index: int, path_root: Path | None) -> np.ndarray:
    """The row's image as HxWx3 uint8: from `image` when set, else decoded from `path`; at least MIN_SIDE
    pixels a side, as launch/deblur.py asks, and at most MAX_PIXELS."""
    image = _decode_row(row, index, path_root)
    if min(image.shape[:2]) < MIN_SIDE:
        raise DataError(
            f"row {index}: the image is {image.shape[1]}x{image.shape[0]} pixels; the networks' "
            f"reflected borders need at least {MIN_SIDE} pixels a side"
        )
    return image


def _declared_size(value, index: int) -> tuple[int, int]:
    """(width, height) of an `image` value, an array or nested lists, read before it is converted."""
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(shape[1]), int(shape[0])
    try:
        return len(value[0]), len(value)
    except (TypeError, IndexError, KeyError):
        raise DataError(f"row {index}: '{IMAGE}' must be an HxWx3 array of values 0..255") from None


def _decode_row(row: pd.Series, index: int, path_root: Path | None) -> np.ndarray:
    from golf_dist.data.formats import check_pixels, decode_pil

    value = row.get(IMAGE)
    if value is not None and not (isinstance(value, float) and np.isnan(value)):
        check_pixels(*_declared_size(value, index), f"row {index}")
        image = np.asarray(value)
        if image.ndim != 3 or image.shape[2] != 3 or image.min() < 0 or image.max() > 255:
            raise DataError(f"row {index}: '{IMAGE}' must be an HxWx3 array of values 0..255, got shape {image.shape}")
        return image.astype(np.uint8)
    path = row.get(PATH)
    if not isinstance(path, str) or not path:
        raise DataError(f"row {index}: give an '{IMAGE}' array or a '{PATH}'")
    if path_root is None:
        raise DataError(
            f"row {index}: this model takes no '{PATH}' (it was logged without a folder to read images "
            f"from): send the pixels in '{IMAGE}'"
        )
    # relative to the root; links followed before the check. One message whether the file is missing, outside
    # the root or not a file, so an answer tells the caller nothing about the server's files.
    file = (path_root / path).resolve()
    if not (file.is_relative_to(path_root) and file.is_file()):
        raise DataError(f"row {index}: no image at '{PATH}' {path!r} in the model's image folder")
    return decode_pil(file.read_bytes(), f"row {index}: image {path!r}")


class GolfModel(mlflow.pyfunc.PythonModel):
    """F, then `iterations` G steps, self-ensembled as `ensemble` says (model_config: what the evaluation
    that registered it measured), on whole images, on the CPU or the first GPU. `iterations` "auto" (with
    `tolerance` and `max_iterations`, each optional): G runs on each image until its update is small."""

    def load_context(self, context) -> None:
        from golf_dist.checkpoints import load_into
        from golf_dist.models import f_net, g_net

        config = context.model_config or {}
        self.iterations = model_iterations(config)
        self.ensemble = str(config.get("ensemble", "x1"))
        root = config.get("path_root")
        self.path_root = Path(root) if root else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.f = load_into(f_net(), Path(context.artifacts["f"]), "F").to(self.device).eval()
        self.g = (
            load_into(g_net(), Path(context.artifacts["g"]), "G").to(self.device).eval()
            if most_iterations(self.iterations) > 0
            else None
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Errors reach the caller as an MlflowException with a message and no traceback: for any other
        exception the scoring server answers with its traceback, which names the server's files."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        from golf_dist.data.torch_loader import to_tensor
        from golf_dist.inference.engine import restore, to_uint8

        if isinstance(model_input, dict):
            model_input = pd.DataFrame([model_input])
        outputs = []
        for index, (_, row) in enumerate(model_input.iterrows()):
            try:
                blur = to_tensor(_row_image(row, index, self.path_root)).unsqueeze(0).to(self.device)
            except DataError as err:
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
            try:
                with torch.no_grad():
                    restored = restore(self.f, self.g, blur, self.iterations, ensemble=self.ensemble).iterates[-1]
            except Exception:  # out of memory, a device error ...: the details stay in the server's log
                log.exception(f"row {index}: the model failed")
                raise MlflowException(
                    f"row {index}: the model failed on this image (the server's log says why)",
                    error_code=INTERNAL_ERROR,
                ) from None
            outputs.append(to_uint8(restored[0]))
        return pd.DataFrame({IMAGE: outputs})


def model_iterations(config: dict) -> int | AutoIterations:
    """The G iterations a model config asks for: `iterations` a count (default 3) or "auto", with `tolerance` and
    `max_iterations` (auto only); a ConfigError naming the config's key otherwise."""
    return parse_iterations(
        config.get("iterations", 3), config.get("tolerance"), config.get("max_iterations"), CONFIG_FLAGS
    )


def log_model(
    output_dir: Path,
    iterations: int | AutoIterations,
    ensemble: str = "x1",
    name: str = "model",
    path_root: Path | None = None,
):
    """Log F + G of a training output folder as a pyfunc model into the active MLflow run; the ModelInfo.
    `path_root`: the folder whose images the served model may read through the `path` column (None: none)."""
    import golf_dist

    config = iteration_fields(iterations)
    model_iterations(config)  # the checks the model makes when it loads, made before anything is logged
    if path_root is not None:
        path_root = Path(path_root).resolve()
        if not path_root.is_dir():
            raise ConfigError(f"path_root {path_root} is not a folder: the model could read no images there")
    output_dir = Path(output_dir)
    artifacts = {"f": str(output_dir / "f.safetensors")}
    if most_iterations(iterations) > 0:
        artifacts["g"] = str(output_dir / "g.safetensors")
    for what, path in artifacts.items():
        if not Path(path).is_file():
            raise DataError(f"no trained {what.upper()} at {path} to put in the MLflow model")
    example = pd.DataFrame({IMAGE: [np.full((8, 8, 3), 128, dtype=np.uint8).tolist()]})
    versions = {
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "mlflow": mlflow.__version__,
    }
    requirements = [f"{package}=={version}" for package, version in versions.items()]
    requirements += ["safetensors", "pillow"]
    config["ensemble"] = ensemble
    if path_root is not None:
        config["path_root"] = str(path_root)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("mlflow_model_code.py")),
        artifacts=artifacts,
        model_config=config,
        code_paths=[str(Path(golf_dist.__file__).parent)],
        signature=signature(),
        input_example=example,
        pip_requirements=requirements,
    )


def register_model(
    tracker,
    output_dir: Path,
    iterations: int | AutoIterations,
    ensemble: str,
    name: str,
    test_psnr: float,
    path_root: str | None = None,
) -> dict[str, str]:
    """Log F + G (run as evaluated: `iterations`, `ensemble`; reading the `path` column under `path_root` only)
    as a pyfunc model into the evaluation's MLflow run and register it as NAME, its test PSNR a tag of the new
    version. Unlike metrics, this does not survive an unreachable store: it is what was asked for."""
    from golf_dist.errors import TrackingError
    from golf_dist.tracking import fluent_tracking_uri

    if tracker.run_id is None:
        raise TrackingError(
            f"--register {name}: the MLflow store at {tracker.display_uri} did not take the "
            "evaluation's run, so there is no run to log the model into"
        )
    with fluent_tracking_uri(tracker.uri):
        with mlflow.start_run(run_id=tracker.run_id):
            info = log_model(output_dir, iterations, ensemble, path_root=path_root)
        version = mlflow.register_model(info.model_uri, name, tags={"test_psnr": f"{test_psnr:.4f}"})
    log.info(f"registered model {name} version {version.version} ({info.model_uri}; test PSNR {test_psnr:.2f} dB)")
    return {"name": name, "version": str(version.version), "model_uri": info.model_uri}
