"""Trained F and G out of the training tool: ONNX graphs with dynamic batch, height and width, run by ONNX
Runtime (`launch/deblur.py --engine onnxruntime`) or any other ONNX runtime. Each graph is checked against
PyTorch on an image of a size it was not traced at before it is kept, and appears whole or not at all."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from golf_dist.errors import DataError
from golf_dist.evaluate import load_trained
from golf_dist.inference import ONNX_FILES, OnnxNetwork
from golf_dist.log import get_logger

log = get_logger(__name__)
PARITY_TOLERANCE = 1e-4  # fp32 ONNX Runtime against fp32 PyTorch, max absolute difference on [0, 1] pixels
TRACE_SHAPE = (1, 3, 64, 96)
CHECK_SHAPE = (2, 3, 75, 53)  # another batch, odd sides, portrait: proves the axes are dynamic


def _export_one(net: torch.nn.Module, what: str, dest: Path) -> float:
    """Export `net` to dest (through a temporary beside it), check parity; the max absolute difference."""
    from torch.export import Dim

    tmp = dest.with_name(f".{dest.name}.tmp")
    dynamic = {"x": {0: Dim("batch"), 2: Dim("height", min=4), 3: Dim("width", min=4)}}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its progress lines and torchvision notes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notes
            torch.onnx.export(net, (torch.rand(TRACE_SHAPE),), str(tmp), input_names=["image"],
                              output_names=["estimate"], dynamic_shapes=dynamic, dynamo=True, external_data=False,
                              verbose=False)
        probe = torch.rand(CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = net(probe)
        difference = (OnnxNetwork(tmp, what)(probe) - expected).abs().max().item()
        if not difference <= PARITY_TOLERANCE:
            raise DataError(f"the ONNX graph of {what} differs from PyTorch by {difference:.2e} (more than "
                            f"{PARITY_TOLERANCE:.0e}) on a {CHECK_SHAPE[2]}x{CHECK_SHAPE[3]} image: not written")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return difference


def export_onnx(output_dir: Path, onnx_dir: Path) -> dict[str, dict[str, object]]:
    """OUTPUT_DIR's f.safetensors (and g.safetensors where it exists) as ONNX_DIR/f.onnx (g.onnx); per
    network its path and the parity check's max absolute difference."""
    output_dir, onnx_dir = Path(output_dir), Path(onnx_dir)
    with_g = (output_dir / "g.safetensors").is_file()
    f, g = load_trained(output_dir, torch.device("cpu"), iterations=1 if with_g else 0)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, net in (("f", f), ("g", g)):
        if net is None:
            log.warning(f"no trained G at {output_dir / 'g.safetensors'}: exported F alone")
            continue
        dest = onnx_dir / ONNX_FILES[name]
        difference = _export_one(net.float().eval(), name.upper(), dest)
        written[name] = {"path": str(dest), "max_abs_difference": difference}
        log.info(f"{name.upper()}: {dest} ({dest.stat().st_size / 1e6:.2f} MB), ONNX Runtime against PyTorch: "
                 f"max |difference| {difference:.1e}")
    return written
