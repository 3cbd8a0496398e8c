"""SIGKILL at random steps of training, for each of {torch, DALI} x {stage f, stage g}: the run is killed
KILLS times at steps (and a moment inside the step: the forward pass, the optimizer step, a checkpoint
being written) drawn by a seeded RNG, restarted after each kill, and must end bitwise equal to an
uninterrupted run: exported and best weights, the last checkpoint's weights and Adam state.

The step counter is the run's own metrics.jsonl (one line per step, log_every=1); a kill goes to the run's
process group. The two loaders' runs go side by side (single-threaded runs, 2 cores)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from conftest import log_lines  # tests/conftest.py

from .conftest import STEPS, differences, in_parallel, leftovers, train_argv, train_config

KILLS = 2  # per (loader, stage): 8 in all
LOADERS = ("torch", "dali")


def logged_steps(metrics: Path, skip_lines: int) -> list[int]:
    """Steps of the complete lines of metrics.jsonl after its first `skip_lines` (those of earlier runs)."""
    if not metrics.is_file():
        return []
    text = metrics.read_text()
    lines = text.split("\n")[:-1]  # the last element is a partial line (or empty)
    return [json.loads(line)["step"] for line in lines[skip_lines:] if line.strip()]


def line_count(metrics: Path) -> int:
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def kill_chain(server, references, loader: str, stage: str, folder: Path) -> dict:
    """Run, kill at a random step, restart ... KILLS times, then let it finish; what happened, for the record."""
    rng = random.Random(f"kill-training-{loader}-{stage}")
    targets = sorted(rng.sample(range(1, STEPS - 1), KILLS))  # never the last two steps: the kill must land
    cfg = train_config(folder / "cfg.yaml", references.shards, folder / "out")
    argv = train_argv(cfg, stage, *references.overrides(loader, stage))
    out = folder / "out"
    metrics = out / stage / "metrics.jsonl"
    events = []
    for i, target in enumerate(targets):
        before = line_count(metrics)
        run = server.run(argv, folder / f"killed-{i}")
        deadline = time.monotonic() + 240
        while not (steps := logged_steps(metrics, before)) or steps[-1] < target:
            assert run.running(), f"run {i} ended before step {target}:\n{run.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"run {i} did not reach step {target} in 240 s"
            time.sleep(0.005)
        delay = rng.uniform(0.0, 0.3)  # about one step: anywhere in forward, backward, step, checkpoint
        time.sleep(delay)
        assert run.running(), f"run {i} finished before its kill (step {target} + {delay:.2f} s)"
        ckpts = out / stage / "checkpoints"
        run.kill()
        mid_write = any(p.name.startswith(".tmp-") for p in ckpts.iterdir()) if ckpts.is_dir() else False
        assert run.rc is None, "the run wrote an exit status: it was not killed"
        assert not (out / f"{stage}.safetensors").exists(), "the run finished before its kill"
        events.append(
            {"after_step": logged_steps(metrics, before)[-1], "delay_s": round(delay, 3), "mid_checkpoint": mid_write}
        )
    final = server.run(argv, folder / "final").check()
    resumed = [line for line in log_lines(final.stdout) if line.startswith(f"resuming stage {stage} from")]
    return {
        "events": events,
        "resumed": resumed,
        "diffs": differences(references.get(loader, stage), out, stage),
        "leftovers": leftovers(out),
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["f", "g"])
def test_sigkill_at_random_steps_then_the_rerun_is_bitwise_identical(stage, forkserver, references, tmp_path, record):
    record.expect("SIGKILL at a random step of training", f"stage {stage}, torch and DALI loaders")
    references.prefetch([(loader, stage) for loader in LOADERS])
    results = in_parallel(
        *[
            (lambda loader=loader: kill_chain(forkserver, references, loader, stage, tmp_path / loader))
            for loader in LOADERS
        ]
    )
    for loader, result in zip(LOADERS, results):
        events = result["events"]
        where = ", ".join(
            f"step {e['after_step']} +{e['delay_s']:.2f} s"
            + (" (in a checkpoint write)" if e["mid_checkpoint"] else "")
            for e in events
        )
        target = f"{'DALI' if loader == 'dali' else 'torch'} loader, stage {stage}"
        assert len(result["resumed"]) == 1, f"{target}: the rerun did not resume from a checkpoint"
        if result["diffs"] or result["leftovers"]:
            record(
                "SIGKILL at a random step of training",
                target,
                len(events),
                "data lost",
                f"killed at {where}; differs from the uninterrupted run: {result['diffs']}; "
                f"temporaries left: {result['leftovers']}",
            )
        record(
            "SIGKILL at a random step of training",
            target,
            len(events),
            "identical",
            f"killed at {where}; the rerun ends bitwise equal to an uninterrupted run",
        )
