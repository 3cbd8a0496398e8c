"""Reproducible installs: launch/constraints.txt (written by infra/ci/freeze_constraints.py, used by launch/setup.sh)
pins the versions this suite runs with, everything golf-dist pulls in except torch's build (docs/installing.md)."""

import json
import os
import re
from pathlib import Path

import pytest
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
    build_bound = [
        n
        for n in pins
        if n in ("torch", "triton") or re.fullmatch(r"nvidia-(?!dali|nvimgcodec|nvjpeg|nvtiff|libnvcomp).*-cu\d+", n)
    ]
    assert not build_bound, f"constraints.txt pins what torch's build decides: {build_bound}"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(r)
        for r in [
            *project["dependencies"],
            *project["optional-dependencies"]["test"],
            *project["optional-dependencies"]["server"],
        ]
    ]
    names = {_name(r.name) for r in wanted if r.marker is None or r.marker.evaluate()}
    unpinned = sorted(names - set(pins) - {"torch", "triton"})
    assert not unpinned, f"not in constraints.txt: {unpinned} (python3 infra/ci/freeze_constraints.py)"
    assert "accelerate" in names and pins["accelerate"]

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:  # a platform-only package (DALI, DeepSpeed: Linux)
            return None

    differ = {
        name: (version, installed(name)) for name, version in pins.items() if installed(name) not in (version, None)
    }
    assert not differ, (
        "installed versions differ from constraints.txt {name: (pinned, installed)}; refreeze with "
        f"python3 infra/ci/freeze_constraints.py once the suite passes: {differ}"
    )


@pytest.mark.slow
def test_the_wheel_trains_a_bundled_config_without_the_repository(tiny_shards, tmp_path):
    """`pip wheel` of the package, installed (no dependencies: they are this machine's) into a fresh virtual
    environment, used from a folder outside the checkout: the venv's golf_dist is the one imported (not the
    checkout's, installed editable here), `golf-train --help` lists the bundled configs, a missing data folder
    says how to make it, the bundled DeepSpeed launch config finds its JSON, and a tiny run of the bundled demo
    config writes its weights, checkpoint and record."""
    import shutil
    import subprocess
    import sys

    import yaml
    from conftest import mlflow_template

    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "golf_dist", source / "golf_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # the installed setuptools builds it: no package index needed
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist"],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("golf_dist-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True, timeout=120
    )
    python, elsewhere = venv / "bin" / "python", tmp_path / "elsewhere"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", wheel], check=True, capture_output=True, timeout=300)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}

    def run(*argv, timeout=600):
        return subprocess.run(
            [str(a) for a in argv], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout
        )

    where = run(
        python, "-c", "import golf_dist, golf_dist.configs as c; print(golf_dist.__file__); print(c.DEFAULT_CONFIG)"
    )
    assert where.returncode == 0, where.stderr
    module, default = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(default).is_relative_to(venv), where.stdout
    shutil.rmtree(source)  # nothing of the sources left to find

    helped = run(venv / "bin" / "golf-train", "--help")
    assert helped.returncode == 0 and "demo, gopro, gpu_quick" in helped.stdout, helped.stderr
    missing = run(venv / "bin" / "golf-train", "--stage", "f")  # the default, demo: its runs/demo/shards is not here
    assert missing.returncode != 0 and "runs/demo/shards does not exist" in missing.stderr
    assert "data_prep/synth_gopro.py" in missing.stderr and "Traceback" not in missing.stderr
    checked = run(python, "-m", "golf_dist.commands.launch", "check-config", "deepspeed_zero2")
    assert checked.returncode == 0, checked.stderr
    assert Path(json.loads(checked.stdout)["deepspeed_config_file"]).is_relative_to(venv)

    shutil.copy(mlflow_template(), tmp_path / "mlflow.db")
    trained = run(
        venv / "bin" / "golf-train",
        "--config",
        "demo",
        "--stage",
        "f",
        "--output-dir",
        "run",
        f"data.shards={tiny_shards}",
        "data.crop=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.loader=torch",
        "train.steps=2",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.val_every=2",
        "train.checkpoint_every=2",
        "val.max_pairs=1",
        "val.sample_images=0",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    out = elsewhere / "run"
    assert (out / "f.safetensors").is_file() and (out / "f" / "checkpoints" / "step-00000002").is_dir()
    record = yaml.safe_load((out / "f" / "config.yaml").read_text())
    # demo.yaml's own values (the bundled file was read) under the overrides
    assert (record["train"]["schedule"], record["train"]["ema_decay"], record["tracking"]["experiment"]) == (
        "cosine",
        0.99,
        "golf-demo",
    )
    assert record["data"]["crop"] == 32 and record["train"]["steps"] == 2
