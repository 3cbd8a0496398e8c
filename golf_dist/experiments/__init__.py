"""The paper's experiments, one module each, run by launch/experiment.py (golf_dist/commands/experiment.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def record(
    name: str,
    out: Path,
    result: dict,
    params: dict[str, Any],
    metrics: Iterable[tuple[dict[str, float], int]],
    figure: Path,
    tracking_uri: str | None,
    experiment: str = "golf-paper",
) -> None:
    """What every experiment leaves: one MLflow run (tag golf.experiment=NAME; its params, each (metrics, step)
    and the figure) when tracking_uri is set, and OUT/<name with _>.json written whole."""
    from golf_dist.files import write_atomic
    from golf_dist.tracking import Tracker

    tracker = Tracker(tracking_uri is not None, tracking_uri, experiment)
    tracker.start(run_name=name, tags={"golf.experiment": name})
    tracker.log_params(params)
    for values, step in metrics:
        tracker.log_metrics(values, step=step)
    tracker.log_artifact(figure, "figures")
    tracker.end()
    write_atomic(Path(out) / f"{name.replace('-', '_')}.json", json.dumps(result, indent=2).encode())
