"""How a trained F + G runs on an image, for evaluation and deblurring alike: on an engine (PyTorch, or ONNX
Runtime on the graphs `launch/export.py --onnx` writes), whole or on tiles (golf_dist.inference.tiling), plain or
self-ensembled (golf_dist.inference.ensemble)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from golf_dist.errors import ConfigError, DataError
from golf_dist.inference.ensemble import ensemble_iterates
from golf_dist.inference.tiling import tiled_iterates

ENGINES = ("torch", "onnxruntime")
MIN_SIDE = 4  # a 7x7 convolution pads 3 pixels by reflection, which needs 4 pixels to reflect
# G iterations at test time: the paper's F + G converges after 2 to 4; each costs one full pass of G, so a bound
# refuses a request that would run for hours (deblur and evaluate --iterations, the MLflow model's config)
MAX_ITERATIONS = 100
ONNX_FILES = {"f": "f.onnx", "g": "g.onnx"}
# launch/export.py's record of the pair it wrote: each graph's sha256 (None: not exported) and the weights and
# training runs they came from; the onnxruntime engine runs only graphs whose bytes match it
ONNX_MANIFEST = "onnx.json"


def check_iterations(iterations: int, flag: str = "--iterations") -> None:
    """ConfigError naming `flag` unless 0 <= iterations <= MAX_ITERATIONS."""
    if not 0 <= iterations <= MAX_ITERATIONS:
        raise ConfigError(
            f"{flag} must be between 0 and {MAX_ITERATIONS} (the paper's F + G converges after 2 to "
            f"4 G iterations), got {iterations}"
        )


def _no_graph(path: Path, what: str) -> DataError:
    return DataError(
        f"no ONNX graph of {what} at {path}: export it first with "
        f"launch/export.py --output-dir DIR --onnx {path.parent}"
    )


class OnnxNetwork:
    """An exported network run by ONNX Runtime, called like the PyTorch module it came from (an Nx3xHxW float
    tensor in, the same shape out, on the input's device)."""

    def __init__(self, path: Path, what: str, sha256: str | None = None):
        """`sha256`: the digest the graph must have (its export's manifest); checked on the very bytes loaded."""
        if not path.is_file():
            raise _no_graph(path, what)
        graph = path.read_bytes()
        found = hashlib.sha256(graph).hexdigest()
        if sha256 is not None and found != sha256:
            raise DataError(
                f"ONNX graph {path} is not the {what} its export recorded in {path.parent / ONNX_MANIFEST} "
                f"(sha256 {found}, recorded {sha256}): it was replaced or "
                f"damaged since; export the pair again with launch/export.py --onnx {path.parent}"
            )
        try:
            import onnxruntime
        except ImportError as err:
            raise DataError("--engine onnxruntime needs ONNX Runtime: pip install onnxruntime") from err
        # CUDA where ONNX Runtime's GPU build is installed, else the CPU
        providers = [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()
        ]
        try:
            self.session = onnxruntime.InferenceSession(graph, providers=providers)
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable graphs
            raise DataError(f"ONNX graph {path} cannot be loaded: {err}") from err
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def to_uint8(image: Tensor) -> np.ndarray:
    """3xHxW float in [0, 1] (clamped) -> HxWx3 uint8, rounded: the pixels every output image gets."""
    return image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def read_onnx_manifest(folder: Path) -> dict:
    """FOLDER's ONNX_MANIFEST; a DataError naming it when it is missing or not what launch/export.py writes."""
    path = Path(folder) / ONNX_MANIFEST
    if not path.is_file():
        raise DataError(
            f"no ONNX manifest {path}: the graphs in {folder} were not written as a pair by this version "
            f"of launch/export.py, so F and G may not belong together; export them again with "
            f"launch/export.py --output-dir DIR --onnx {folder}"
        )
    try:
        manifest = json.loads(path.read_text())
        digests = manifest["sha256"]
        if not (isinstance(digests.get("f"), str) and (digests.get("g") is None or isinstance(digests["g"], str))):
            raise ValueError("sha256.f must be a digest, sha256.g a digest or null")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f"ONNX manifest {path} is unreadable ({err}): export the pair again with launch/export.py --onnx {folder}"
        ) from None
    return manifest


def load_onnx(folder: Path, iterations: int) -> tuple[OnnxNetwork, OnnxNetwork | None]:
    """F (and G when iterations > 0) as ONNX Runtime sessions over FOLDER/f.onnx and FOLDER/g.onnx, each only
    when its bytes are those FOLDER's manifest records (the pair one export wrote)."""
    folder = Path(folder)
    if not (folder / ONNX_FILES["f"]).is_file():  # nothing exported here: say that before asking for a manifest
        raise _no_graph(folder / ONNX_FILES["f"], "F")
    digests = read_onnx_manifest(folder)["sha256"]
    if iterations > 0 and digests["g"] is None:
        raise DataError(
            f"the ONNX export in {folder} holds F alone (its training output had no G): run it with "
            "--iterations 0, or train stage g and export again"
        )
    f = OnnxNetwork(folder / ONNX_FILES["f"], "F", digests["f"])
    return f, (OnnxNetwork(folder / ONNX_FILES["g"], "G", digests["g"]) if iterations > 0 else None)


def restore_iterates(
    f, g, blur: Tensor, iterations: int, tile: int | None = None, overlap: int = 32, ensemble: str = "x1"
) -> list[Tensor]:
    """F's estimate and each of `iterations` G iterations' of a 1x3xHxW image, on tiles when `tile` is set,
    averaged over the transforms of `ensemble` (x1: none). f and g: modules or OnnxNetworks."""
    return ensemble_iterates(lambda image: tiled_iterates(f, g, image, iterations, tile, overlap), blur, ensemble)


def load_trained(output_dir: Path, device: torch.device, iterations: int):
    """F (and G when iterations > 0) from a training output folder, in eval mode on `device`."""
    from golf_dist.checkpoints import load_into
    from golf_dist.errors import DataError
    from golf_dist.models import f_net, g_net

    f_path, g_path = Path(output_dir) / "f.safetensors", Path(output_dir) / "g.safetensors"
    if not f_path.is_file():
        raise DataError(f"no trained F at {f_path}: train stage f with --output-dir {output_dir} first")
    f = load_into(f_net(), f_path, "F")
    g = None
    if iterations > 0:
        if not g_path.is_file():
            raise DataError(
                f"no trained G at {g_path}: train stage g with --output-dir {output_dir} first, "
                "or use F alone with --iterations 0"
            )
        g = load_into(g_net(), g_path, "G").to(device).eval()
    return f.to(device).eval(), g
