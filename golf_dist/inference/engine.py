"""How a trained F + G runs on an image, for evaluation and deblurring alike: on an engine (PyTorch, or ONNX
Runtime on the graphs `launch/export.py --onnx` writes), whole or on tiles (golf_dist.inference.tiling), plain or
self-ensembled (golf_dist.inference.ensemble)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from golf_dist.errors import ConfigError, DataError
from golf_dist.inference.ensemble import EnsembleSteps, check_ensemble, ensemble_iterates
from golf_dist.inference.tiling import check_tiling, tiled_iterates, tiled_steps

ENGINES = ("torch", "onnxruntime")
MIN_SIDE = 4  # a 7x7 convolution pads 3 pixels by reflection, which needs 4 pixels to reflect
# G iterations at test time: the paper's F + G converges after 2 to 4; each costs one full pass of G, so a bound
# refuses a request that would run for hours (deblur and evaluate --iterations, the MLflow model's config)
MAX_ITERATIONS = 100
# --iterations auto: G runs on each image until its update's mean absolute change falls below the tolerance, or
# the maximum count is reached (docs/using-a-model.md, "Adaptive G iterations", measures both on the demo)
DEFAULT_TOLERANCE = 3e-3
DEFAULT_MAX_ITERATIONS = 4
ITERATION_FLAGS = ("--iterations", "--tolerance", "--max-iterations")
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


@dataclass(frozen=True)
class AutoIterations:
    """`--iterations auto`: after F, G runs on each image until its update's mean absolute change (over the image's
    pixels and channels, in [0, 1] pixel units) is below `tolerance`, or `maximum` times."""

    tolerance: float = DEFAULT_TOLERANCE
    maximum: int = DEFAULT_MAX_ITERATIONS

    def __str__(self) -> str:
        return f"auto (tolerance {self.tolerance:g}, at most {self.maximum})"


def most_iterations(iterations: int | AutoIterations) -> int:
    """The most G iterations a run may take: the count, or auto's maximum."""
    return iterations.maximum if isinstance(iterations, AutoIterations) else iterations


def iteration_fields(iterations: int | AutoIterations) -> dict:
    """How the G iterations were asked for, as evaluation.json, the MLflow params and the model's config say it:
    {"iterations": N} or {"iterations": "auto", "tolerance": T, "max_iterations": M}."""
    if isinstance(iterations, AutoIterations):
        return {"iterations": "auto", "tolerance": iterations.tolerance, "max_iterations": iterations.maximum}
    return {"iterations": iterations}


def _number(value, kind: type, flag: str, must: str):
    """`value` (a command line's text, or a config's number) as `kind`; a ConfigError naming `flag` otherwise."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{flag} must be {must}, got {value!r}") from None


def parse_iterations(
    iterations, tolerance=None, maximum=None, flags: tuple[str, str, str] = ITERATION_FLAGS
) -> int | AutoIterations:
    """G iterations as asked for: an integer 0..MAX_ITERATIONS, or 'auto' with its tolerance and maximum (None:
    the defaults). A ConfigError naming the flag (`flags`: how iterations, tolerance and maximum are named to
    the user) for anything else, and for a tolerance or maximum without auto: a flag that would be ignored."""
    iterations_flag, tolerance_flag, maximum_flag = flags
    if isinstance(iterations, str) and iterations.strip().lower() == "auto":
        tolerance = DEFAULT_TOLERANCE if tolerance is None else _number(tolerance, float, tolerance_flag, "a number")
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ConfigError(
                f"{tolerance_flag} must be above 0 (a mean absolute change per G iteration, in [0, 1] pixel "
                f"units; default {DEFAULT_TOLERANCE:g}), got {tolerance:g}"
            )
        must = f"an integer from 1 to {MAX_ITERATIONS}"
        maximum = DEFAULT_MAX_ITERATIONS if maximum is None else _number(maximum, int, maximum_flag, must)
        if not 1 <= maximum <= MAX_ITERATIONS:
            raise ConfigError(f"{maximum_flag} must be {must} (auto runs G at least once), got {maximum}")
        return AutoIterations(tolerance, maximum)
    count = _number(iterations, int, iterations_flag, f"an integer from 0 to {MAX_ITERATIONS} or 'auto'")
    check_iterations(count, iterations_flag)
    for flag, value in ((tolerance_flag, tolerance), (maximum_flag, maximum)):
        if value is not None:
            raise ConfigError(
                f"{flag} applies only to {iterations_flag} auto, and the iterations asked for are {count}: "
                f"pass {iterations_flag} auto, or leave {flag} out"
            )
    return count


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


def load_onnx(folder: Path, iterations: int | AutoIterations) -> tuple[OnnxNetwork, OnnxNetwork | None]:
    """F (and G when iterations may be > 0) as ONNX Runtime sessions over FOLDER/f.onnx and FOLDER/g.onnx, each only
    when its bytes are those FOLDER's manifest records (the pair one export wrote)."""
    folder, iterations = Path(folder), most_iterations(iterations)
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


class Restoration(NamedTuple):
    """What `restore` gives: F's estimate of the batch, then the batch after each G iteration that ran (an image
    that stopped keeps its last estimate), and the G iterations each image ran (a CPU long tensor)."""

    iterates: list[Tensor]
    used: Tensor


@torch.no_grad()
def restore(
    f, g, blur: Tensor, iterations: int | AutoIterations, tile: int | None = None, overlap: int = 32, ensemble="x1"
) -> Restoration:
    """restore_iterates for a count of G iterations; for AutoIterations, G runs on each image of the NxCxHxW batch
    until its update's mean absolute change is below the tolerance, or the maximum count. With `tile` and
    `ensemble`, an image's change is measured on the whole image, as blended from its tiles and averaged over
    the ensemble's transforms (the image the user gets), and all its tiles and transforms stop together."""
    if not isinstance(iterations, AutoIterations) or g is None:
        iterates = restore_iterates(f, g, blur, iterations if g is not None else 0, tile, overlap, ensemble)
        return Restoration(iterates, torch.full((blur.shape[0],), len(iterates) - 1, dtype=torch.long))
    check_tiling(tile, overlap)
    check_ensemble(ensemble)
    steps = EnsembleSteps(lambda image: tiled_steps(f, g, image, tile, overlap), blur, ensemble)
    iterates = [steps.estimate]
    used = torch.zeros(blur.shape[0], dtype=torch.long)
    active = torch.ones(blur.shape[0], dtype=torch.bool, device=blur.device)
    while len(iterates) <= iterations.maximum and bool(active.any()):
        estimate = steps.step(active)
        change = (estimate.float() - iterates[-1].float()).abs().flatten(1).mean(1)
        used += active.cpu()
        active = active & (change >= iterations.tolerance)
        iterates.append(estimate)
    return Restoration(iterates, used)


def load_trained(output_dir: Path, device: torch.device, iterations: int | AutoIterations):
    """F (and G when iterations may be > 0) from a training output folder, in eval mode on `device`."""
    from golf_dist.checkpoints import load_into
    from golf_dist.errors import DataError
    from golf_dist.models import f_net, g_net

    f_path, g_path = Path(output_dir) / "f.safetensors", Path(output_dir) / "g.safetensors"
    if not f_path.is_file():
        raise DataError(f"no trained F at {f_path}: train stage f with --output-dir {output_dir} first")
    f = load_into(f_net(), f_path, "F")
    g = None
    if most_iterations(iterations) > 0:
        if not g_path.is_file():
            raise DataError(
                f"no trained G at {g_path}: train stage g with --output-dir {output_dir} first, "
                "or use F alone with --iterations 0"
            )
        g = load_into(g_net(), g_path, "G").to(device).eval()
    return f.to(device).eval(), g
