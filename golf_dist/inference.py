"""How a trained F + G runs on an image, for evaluation and deblurring alike: on an engine (PyTorch, or ONNX
Runtime on the graphs `launch/export.py --onnx` writes), whole or on tiles (golf_dist.tiling), plain or
self-ensembled (golf_dist.ensemble)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from golf_dist.ensemble import ensemble_iterates
from golf_dist.errors import DataError
from golf_dist.tiling import tiled_iterates

ENGINES = ("torch", "onnxruntime")
MIN_SIDE = 4  # a 7x7 convolution pads 3 pixels by reflection, which needs 4 pixels to reflect
ONNX_FILES = {"f": "f.onnx", "g": "g.onnx"}


class OnnxNetwork:
    """An exported network run by ONNX Runtime, called like the PyTorch module it came from (an Nx3xHxW float
    tensor in, the same shape out, on the input's device)."""

    def __init__(self, path: Path, what: str):
        if not path.is_file():
            raise DataError(f"no ONNX graph of {what} at {path}: export it first with "
                            f"launch/export.py --output-dir DIR --onnx {path.parent}")
        try:
            import onnxruntime
        except ImportError as err:
            raise DataError("--engine onnxruntime needs ONNX Runtime: pip install onnxruntime") from err
        # CUDA where ONNX Runtime's GPU build is installed, else the CPU
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable graphs
            raise DataError(f"ONNX graph {path} cannot be loaded: {err}") from err
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def to_uint8(image: Tensor) -> np.ndarray:
    """3xHxW float in [0, 1] (clamped) -> HxWx3 uint8, rounded: the pixels every output image gets."""
    return (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def load_onnx(folder: Path, iterations: int) -> tuple[OnnxNetwork, OnnxNetwork | None]:
    """F (and G when iterations > 0) as ONNX Runtime sessions over FOLDER/f.onnx and FOLDER/g.onnx."""
    folder = Path(folder)
    f = OnnxNetwork(folder / ONNX_FILES["f"], "F")
    return f, (OnnxNetwork(folder / ONNX_FILES["g"], "G") if iterations > 0 else None)


def restore_iterates(f, g, blur: Tensor, iterations: int, tile: int | None = None, overlap: int = 32,
                     ensemble: str = "x1") -> list[Tensor]:
    """F's estimate and each of `iterations` G iterations' of a 1x3xHxW image, on tiles when `tile` is set,
    averaged over the transforms of `ensemble` (x1: none). f and g: modules or OnnxNetworks."""
    return ensemble_iterates(lambda image: tiled_iterates(f, g, image, iterations, tile, overlap), blur, ensemble)
