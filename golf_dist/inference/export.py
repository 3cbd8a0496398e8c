"""Trained F and G out of the training tool: ONNX graphs with dynamic batch, height and width, run by ONNX
Runtime (`launch/deblur.py --engine onnxruntime`) or any other ONNX runtime. Each graph is checked against
PyTorch on an image of a size it was not traced at before it is kept. The graphs travel as a pair: both are
exported and checked in a staging folder before either replaces anything, and the folder's manifest
(golf_dist.inference.engine.ONNX_MANIFEST: each graph's sha256, the weights and training runs they came from) is
written last, so the onnxruntime engine never runs an F with a G of another export."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from golf_dist.errors import DataError
from golf_dist.files import sha256_file, write_atomic
from golf_dist.inference.engine import ONNX_FILES, ONNX_MANIFEST, OnnxNetwork, load_trained
from golf_dist.log import get_logger
from golf_dist.training.resume import StagePaths

log = get_logger(__name__)
PARITY_TOLERANCE = 1e-4  # fp32 ONNX Runtime against fp32 PyTorch, max absolute difference on [0, 1] pixels
TRACE_SHAPE = (1, 3, 64, 96)
CHECK_SHAPE = (2, 3, 75, 53)  # another batch, odd sides, portrait: proves the axes are dynamic


def _export_one(net: torch.nn.Module, what: str, dest: Path) -> float:
    """Export `net` to dest (in the staging folder), check parity; the max absolute difference."""
    from torch.export import Dim

    dynamic = {"x": {0: Dim("batch"), 2: Dim("height", min=4), 3: Dim("width", min=4)}}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its progress lines and torchvision notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notes
        torch.onnx.export(
            net,
            (torch.rand(TRACE_SHAPE),),
            str(dest),
            input_names=["image"],
            output_names=["estimate"],
            dynamic_shapes=dynamic,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    probe = torch.rand(CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(probe)
    difference = (OnnxNetwork(dest, what)(probe) - expected).abs().max().item()
    if not difference <= PARITY_TOLERANCE:
        raise DataError(
            f"the ONNX graph of {what} differs from PyTorch by {difference:.2e} (more than "
            f"{PARITY_TOLERANCE:.0e}) on a {CHECK_SHAPE[2]}x{CHECK_SHAPE[3]} image: neither graph written, "
            "the ONNX folder left as it was"
        )
    return difference


def _source(output_dir: Path, names: list[str]) -> dict[str, str]:
    """Where the exported networks came from: each one's weights file and digest, and its MLflow training run
    (from the stage's run file, when training wrote one)."""
    source = {"output_dir": str(output_dir.resolve())}
    for name in names:
        paths = StagePaths(output_dir, name)
        source[f"{name}_weights_sha256"] = sha256_file(paths.weights)
        if paths.run_info.is_file():
            try:
                source[f"{name}_run_id"] = json.loads(paths.run_info.read_text()).get("mlflow_run_id") or ""
            except (ValueError, AttributeError):
                log.warning(
                    f"{paths.run_info} is unreadable: the ONNX manifest names no training run for {name.upper()}"
                )
    return source


def export_onnx(output_dir: Path, onnx_dir: Path) -> dict[str, dict[str, object]]:
    """OUTPUT_DIR's f.safetensors (and g.safetensors where it exists) as ONNX_DIR/f.onnx (g.onnx) and the pair's
    manifest; per network its path and the parity check's max absolute difference. Written both or neither:
    a graph failing its check leaves ONNX_DIR as it was; F exported alone removes an earlier export's g.onnx."""
    output_dir, onnx_dir = Path(output_dir), Path(onnx_dir)
    with_g = (output_dir / "g.safetensors").is_file()
    f, g = load_trained(output_dir, torch.device("cpu"), iterations=1 if with_g else 0)
    if g is None:
        log.warning(f"no trained G at {output_dir / 'g.safetensors'}: exporting F alone")
    networks = {name: net for name, net in (("f", f), ("g", g)) if net is not None}
    onnx_dir.mkdir(parents=True, exist_ok=True)
    differences, digests = {}, dict.fromkeys(ONNX_FILES)  # digest None: that network not exported
    with tempfile.TemporaryDirectory(prefix="golf-onnx-") as staging:
        for name, net in networks.items():
            differences[name] = _export_one(net.float().eval(), name.upper(), Path(staging) / ONNX_FILES[name])
            digests[name] = sha256_file(Path(staging) / ONNX_FILES[name])
        # every graph passed: replace the pair. The old manifest goes first, so a kill half way leaves graphs
        # that no manifest vouches for, which the engine refuses, rather than a manifest over a mixed pair.
        manifest_path = onnx_dir / ONNX_MANIFEST
        manifest_path.unlink(missing_ok=True)
        for name, file in ONNX_FILES.items():
            if name in networks:
                write_atomic(onnx_dir / file, (Path(staging) / file).read_bytes())
            else:  # an earlier export's G must not be run after this F
                (onnx_dir / file).unlink(missing_ok=True)
    manifest = {"sha256": digests, "max_abs_difference": differences, "source": _source(output_dir, list(networks))}
    write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    written = {}
    for name, difference in differences.items():
        dest = onnx_dir / ONNX_FILES[name]
        written[name] = {"path": str(dest), "max_abs_difference": difference}
        log.info(
            f"{name.upper()}: {dest} ({dest.stat().st_size / 1e6:.2f} MB), ONNX Runtime against PyTorch: "
            f"max |difference| {difference:.1e}"
        )
    return written
