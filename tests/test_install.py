"""Reproducible installs: launch/constraints.txt (written by infra/ci/freeze_constraints.py, used by launch/setup.sh)
pins the versions this suite runs with, everything golf-dist pulls in except torch's build (docs/installing.md)."""

import re

from conftest import ROOT

CONSTRAINTS = ROOT / "launch" / "constraints.txt"


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_but_torchs_build_and_are_what_is_installed():
    """No pin that would swap a GPU torch for a CPU one (torch, triton, CUDA's nvidia-*-cu12); every dependency
    pyproject.toml names for this platform (with the test and server extras) is pinned; and every pin is the
    version installed here: the suite runs on exactly the pinned versions. After `GOLF_LATEST=1 bash
    launch/setup.sh` this fails until infra/ci/freeze_constraints.py records the new versions."""
    from importlib import metadata

    import pytest
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = _pins()
    build_bound = [n for n in pins if n in ("torch", "triton")
                   or re.fullmatch(r"nvidia-(?!dali|nvimgcodec|nvjpeg|nvtiff|libnvcomp).*-cu\d+", n)]
    assert not build_bound, f"constraints.txt pins what torch's build decides: {build_bound}"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"],
                                       *project["optional-dependencies"]["server"]]]
    names = {_name(r.name) for r in wanted if r.marker is None or r.marker.evaluate()}
    unpinned = sorted(names - set(pins) - {"torch", "triton"})
    assert not unpinned, f"not in constraints.txt: {unpinned} (python3 infra/ci/freeze_constraints.py)"
    assert "accelerate" in names and pins["accelerate"]

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:  # a platform-only package (DALI, DeepSpeed: Linux)
            return None

    differ = {name: (version, installed(name)) for name, version in pins.items()
              if installed(name) not in (version, None)}
    assert not differ, ("installed versions differ from constraints.txt {name: (pinned, installed)}; refreeze with "
                        f"python3 infra/ci/freeze_constraints.py once the suite passes: {differ}")
