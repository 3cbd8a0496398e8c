"""Photographs for a held-out evaluation: shipped inside packages the project already depends on, never
used to make training data (golf_dist/data/prep/synthetic.py's SOURCE_NAMES), so they load offline.

From scikit-image's data folder: camera.png (a man with a camera, grass and buildings), brick.png,
grass.png and gravel.png (textures: what a model that smooths clean inputs destroys), coins.png and
moon.png (greyscale, as is most of that folder: they are read as RGB with three equal channels); from
matplotlib's sample data: grace_hopper.jpg (an RGB portrait). Left out: motorcycle_right.png (the other
view of training's motorcycle_left.png), retina.jpg and color.png (see SOURCE_NAMES), cell.png (a
microscope image), text.png (172 pixels high), drawings, masks and logos. scikit-image's clock_motion.png
is a photograph blurred by real camera motion, with no sharp original: a picture to show before and
after, not a PSNR.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from golf_dist.errors import DataError

# (package, data folder inside it, file name)
HELD_OUT_PHOTOGRAPHS = (
    ("skimage", "data", "camera.png"),
    ("skimage", "data", "brick.png"),
    ("skimage", "data", "grass.png"),
    ("skimage", "data", "gravel.png"),
    ("skimage", "data", "coins.png"),
    ("skimage", "data", "moon.png"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
)
REAL_BLUR_PHOTOGRAPH = ("skimage", "data", "clock_motion.png")


@dataclass(frozen=True)
class Photograph:
    name: str  # the file name, e.g. camera.png
    package: str
    path: Path


def _package_file(package: str, folder: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(
            f"{package} is not installed: pip install {'scikit-image' if package == 'skimage' else package}"
            f" (it ships {name})"
        )
    path = Path(spec.origin).parent / folder / name
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package}: reinstall it (pip install --force-reinstall)")
    return path


def held_out_photographs() -> list[Photograph]:
    """The held-out photographs, in HELD_OUT_PHOTOGRAPHS order; a missing one is an error naming it."""
    return [
        Photograph(name, package, _package_file(package, folder, name))
        for package, folder, name in HELD_OUT_PHOTOGRAPHS
    ]


def real_blur_photograph() -> Photograph:
    """scikit-image's clock_motion.png: real camera-motion blur, no ground truth."""
    package, folder, name = REAL_BLUR_PHOTOGRAPH
    return Photograph(name, package, _package_file(package, folder, name))
