#!/usr/bin/env python3
"""Write launch/constraints.txt: the installed version of every package golf-dist pulls in (with its `test` and
`server` extras), as pip constraints. launch/setup.sh (and so .ci/run and launch/quickstart.sh) installs
with it, so a fresh machine gets the versions the suite last passed with, not whatever was released since.

    python3 infra/ci/freeze_constraints.py            # after the suite passed: rewrite constraints.txt
    python3 infra/ci/freeze_constraints.py --check    # exit 1 and list what differs from the installed versions

torch and what follows its build are left out (torch, triton, CUDA's nvidia-*-cu12 libraries; DALI's own
nvidia-* packages stay): setup.sh installs torch itself, the CPU build where there is no GPU and PyPI's CUDA
build where there is one (or reuses an installed torch), and a pin here would have pip swap the one for
the other. docs/installing.md says how to try the newest releases instead (GOLF_LATEST=1).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "launch" / "constraints.txt"
EXTRAS = ("test", "server")
# torch's build decides these: never pinned here (see the docstring)
FOLLOWS_TORCH = re.compile(r"^(torch|triton|nvidia-.*-cu\d+|pytorch-triton.*)$")
DALI = re.compile(r"^nvidia-(dali-.*|nvimgcodec-.*|nvjpeg.*|nvtiff-.*|libnvcomp-.*)$")


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def dependency_tree(root: str = "golf-dist", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{normalised name: installed version} of every installed package `root` needs, transitively."""
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this platform does not install (its marker said no)
        key = _name(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                if _name(req.name) not in found:
                    todo.append((req.name, tuple(req.extras)))
    found.pop(_name(root), None)
    return found


def constraints() -> str:
    pins = {
        name: version
        for name, version in dependency_tree().items()
        if not FOLLOWS_TORCH.match(name) or DALI.match(name)
    }
    head = (
        "# The versions the test suite last passed with (python3 infra/ci/freeze_constraints.py wrote this;\n"
        "# launch/setup.sh installs with it). torch is not here: setup.sh picks its build (docs/installing.md).\n"
    )
    return head + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the installed versions, write nothing")
    args = parser.parse_args(argv)
    text = constraints()
    if args.check:
        old = set(OUT.read_text().splitlines()) if OUT.exists() else set()
        new = set(text.splitlines())
        for line in sorted(old ^ new):
            print(("- " if line in old else "+ ") + line)
        return 0 if old == new else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10)) - 2} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
