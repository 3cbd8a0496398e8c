"""TrainingState: what a checkpoint's state.json says about the run, typed, with one writer (`to_json`)
and one reader (`from_json`). golf_dist.checkpoints adds the step and the files' sha256 map when it writes
the checkpoint; checkpoints written before a field existed read with that field's default."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from golf_dist.errors import DataError

# a field's annotation -> the JSON values it takes (a bool is no number here, though Python calls it an int)
_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}


@dataclass
class TrainingState:
    stage: str | None = None
    steps: int | None = None  # train.steps of the run that wrote it
    step: int = 0  # optimizer steps done
    data_position: int = 0  # training samples handed out so far (step x global batch)
    global_batch: int | None = None
    world_size: int | None = None
    val_psnr: float | None = None  # validation PSNR at this step, if it validated here
    best_val_psnr: float | None = None
    mlflow_run_id: str | None = None
    # the loader that made the run (checkpoints from before DALI: torch); either resumes it, as both hand out
    # the same stream. (Checkpoints of DALI's old reader also hold dali_reader_states: not read any more.)
    data_loader: str = "torch"
    ema_updates: int | None = None  # updates of the weights' moving average (None: EMA off)

    def to_json(self) -> dict[str, Any]:
        """The fields save_checkpoint writes (it adds `step` and the digests itself)."""
        out = asdict(self)
        del out["step"]
        return out

    @classmethod
    def from_json(cls, state: dict[str, Any], source: str | Path = "state.json") -> TrainingState:
        """The typed state; a value of the wrong type is a DataError naming `source` (the file) and the key."""
        values = {}
        for field in fields(cls):
            value = state.get(field.name)
            if value is None:
                continue
            kind = str(field.type).replace(" | None", "")
            if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[kind]):
                article = "an" if kind == "int" else "a"
                raise DataError(
                    f"checkpoint file {source}: {field.name} is {value!r}, not {article} {kind} (damaged or altered)"
                )
            values[field.name] = float(value) if kind == "float" else value
        return cls(**values)

    @property
    def best(self) -> float:
        """best_val_psnr as a number to compare with (-inf when none yet)."""
        return self.best_val_psnr if self.best_val_psnr is not None else -math.inf
