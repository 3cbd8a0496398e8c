"""Where a stage starts from: the output folder's layout, the trained F that stage g needs, the
checkpoint every rank resumes from, and the training data loader that continues from it.

Layout of an output directory:
    DIR/f/config.yaml, DIR/f/checkpoints/step-XXXXXXXX/   stage f (resolved config, checkpoints)
    DIR/f.safetensors, DIR/f_best.safetensors, DIR/f_run.json   exported weights + MLflow run id
    DIR/g/..., DIR/g.safetensors, DIR/g_best.safetensors, DIR/g_run.json
A run started on a directory that holds checkpoints of its stage resumes from the newest one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from golf_dist.checkpoints import clean_stale_temporaries, list_checkpoints, load_latest, read_state
from golf_dist.config import Config
from golf_dist.data.loaders import make_train_loader, resolve_loader
from golf_dist.errors import DataError
from golf_dist.files import sha256_file
from golf_dist.log import get_logger
from golf_dist.tracking import redact
from golf_dist.training.state import TrainingState

log = get_logger(__name__)


@dataclass
class StagePaths:
    output_dir: Path
    stage: str

    @property
    def stage_dir(self) -> Path:
        return self.output_dir / self.stage

    @property
    def checkpoints(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def weights(self) -> Path:
        return self.output_dir / f"{self.stage}.safetensors"

    @property
    def best_weights(self) -> Path:
        return self.output_dir / f"{self.stage}_best.safetensors"

    @property
    def run_info(self) -> Path:
        return self.output_dir / f"{self.stage}_run.json"


def clean_leftovers(paths: StagePaths) -> None:
    """Remove what a killed or disk-full writer left under a temporary name: checkpoints, exports and
    .resume-* downloads (golf_dist.checkpoints.clean_stale_temporaries); each one logged."""
    for folder in (paths.checkpoints, paths.stage_dir, paths.output_dir):
        for stale in clean_stale_temporaries(folder):
            log.info(f"removed the leftover {stale} of an earlier run")


def f_weights_record(output_dir: Path, f_path: Path) -> dict[str, str]:
    """What a stage g run records of the F it starts from: its path, sha256 and (when stage f ran here) the
    F run's MLflow id."""
    record = {"f_weights": str(f_path.resolve()), "f_weights_sha256": sha256_file(f_path)}
    f_run_file = StagePaths(output_dir, "f").run_info
    if f_run_file.is_file():
        record["f_run_id"] = json.loads(f_run_file.read_text()).get("mlflow_run_id") or ""
    return record


def resolve_f_weights(cfg: Config, output_dir: Path) -> Path:
    """The trained F that stage g starts from, or a clear error saying what to run first."""
    if cfg.train.f_weights:
        path = Path(cfg.train.f_weights)
        if not path.is_file():
            raise DataError(f"train.f_weights={path} does not exist")
        return path
    path = StagePaths(output_dir, "f").weights
    if path.is_file():
        return path
    f_ckpts = list_checkpoints(StagePaths(output_dir, "f").checkpoints)
    if f_ckpts:
        state = TrainingState.from_json(read_state(f_ckpts[-1]), source=f_ckpts[-1] / "state.json")
        raise DataError(
            f"stage g needs a trained F, but stage f in {output_dir} has not finished "
            f"(newest checkpoint: step {state.step} of {state.steps}); "
            f"let it finish (rerun stage f with the same --output-dir to resume) or set train.f_weights=PATH"
        )
    raise DataError(
        f"stage g needs a trained F: {path} does not exist. Train it first with "
        f"`launch/train.py --stage f --output-dir {output_dir}` (same config), or set train.f_weights=PATH"
    )


def resume_checkpoint(folder: Path, rank: int, world: int, allow_unverified: bool = False) -> dict[str, Any] | None:
    """The checkpoint of `folder` that every rank resumes from, loaded, or None to start from step 0.

    The main rank (rank 0) chooses: the newest checkpoint that loads (`load_latest`: a damaged newer one is
    skipped, with one warning). It sends the folder's name to the other ranks, and each loads that very
    checkpoint, not the newest one it sees itself (a file system cache, or one rank falling back past a
    damaged checkpoint, would otherwise start ranks from different steps and weights). When a rank cannot
    load it, every rank raises the same DataError naming the chosen checkpoint, the rank and why; no rank is
    left waiting in a collective. A collective: every rank calls it once. `allow_unverified`:
    train.resume_unverified (a checkpoint without the HMAC GOLF_CHECKPOINT_KEY asks for)."""
    from golf_dist.checkpoints import load_checkpoint

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return load_latest(folder, allow_unverified)

    def choose() -> tuple[dict[str, Any] | None, str | None]:
        ckpt = load_latest(folder, allow_unverified)
        return ckpt, None if ckpt is None else ckpt["path"].name

    def load(name: str) -> dict[str, Any]:
        ckpt = load_checkpoint(Path(folder) / name, allow_unverified=allow_unverified)
        ckpt["path"] = Path(folder) / name
        return ckpt

    return _chosen_by_rank_0(
        rank,
        world,
        choose,
        load,
        shown=lambda name: str(Path(folder) / name),
        where=f"in {folder}",
        hint="OUTPUT_DIR must be one file system that every node sees the same (shared, and not stale in a cache)",
    )


def resume_from_checkpoint(
    uri: str, scratch_dir: Path, tracking_uri: str | None, rank: int, world: int, allow_unverified: bool = False
) -> dict[str, Any]:
    """train.resume_from loaded on every rank, the same checkpoint: rank 0 resolves `uri` (a folder of
    checkpoints: its newest) to one checkpoint, loads it and sends its exact location and a fingerprint of its
    state.json to the others, which load that one (each its own download: no shared file system assumed) and
    stop, every rank naming it, when theirs differs (the store changed in between) or cannot be loaded.
    A collective: every rank calls it once."""
    from golf_dist.training.remote import load_resume_checkpoint

    def fetch(where: str) -> dict[str, Any]:
        return load_resume_checkpoint(where, scratch_dir, tracking_uri, allow_unverified=allow_unverified)

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return fetch(uri)

    def choose() -> tuple[dict[str, Any], tuple[str, str]]:
        ckpt = fetch(uri)
        return ckpt, (ckpt["source"], _fingerprint(ckpt["state"]))

    def load(choice: tuple[str, str]) -> dict[str, Any]:
        ckpt = fetch(choice[0])
        if _fingerprint(ckpt["state"]) != choice[1]:
            raise DataError(
                "its state.json differs from the one rank 0 loaded (the checkpoint changed in the "
                "store between the two downloads)"
            )
        return ckpt

    return _chosen_by_rank_0(
        rank,
        world,
        choose,
        load,
        shown=lambda choice: redact(choice[0]),
        where=f"train.resume_from={redact(uri)}",
        hint="every rank must be able to fetch train.resume_from and find the same checkpoint there",
    )


def _fingerprint(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _chosen_by_rank_0(
    rank: int,
    world: int,
    choose: Callable[[], tuple[dict[str, Any] | None, Any]],
    load: Callable[[Any], dict[str, Any]],
    shown: Callable[[Any], str],
    where: str,
    hint: str,
) -> dict[str, Any] | None:
    """Rank 0 runs `choose()` -> (its checkpoint or None, a picklable choice); the choice goes to every rank,
    and each other rank runs `load(choice)`. A failure anywhere raises the same DataError on every rank
    (naming the checkpoint, `shown(choice)`, the ranks and why, then `hint`); no rank waits in a collective."""
    ckpt, choice, own_error, error = None, None, None, None
    if rank == 0:
        try:
            ckpt, choice = choose()
        except Exception as err:  # the others wait for rank 0's choice: they must hear of this too
            own_error, error = err, f"{type(err).__name__}: {err}"
    message = [choice, None if ckpt is None else str(ckpt["path"]), error]
    dist.broadcast_object_list(message, src=0)
    choice, chosen, error = message
    if error is not None:
        if own_error is not None:
            raise own_error
        raise DataError(f"rank {rank}: rank 0 could not choose a checkpoint to resume from {where}: {error}")
    if rank != 0 and choice is not None:
        try:
            ckpt = load(choice)
        except Exception as err:
            error = f"{shown(choice)}: {err}"
    failures: list[str | None] = [None] * world
    dist.all_gather_object(failures, error)
    failed = [(r, why) for r, why in enumerate(failures) if why is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise DataError(
            f"rank 0 resumes from checkpoint {chosen}, but rank(s) {ranks} cannot load it ("
            + "; ".join(f"rank {r}: {why}" for r, why in failed)
            + f"). Every rank must resume from the same checkpoint: {hint}"
        )
    return ckpt


def open_train_loader(
    cfg: Config,
    pairs,
    saved: TrainingState | None,
    ckpt_path: Path | None,
    *,
    global_batch: int,
    accum: int,
    world: int,
    rank: int,
    start_step: int,
    device: torch.device,
    announce: bool,
):
    """The training loader this rank continues with from `start_step` (data.loader auto|dali|torch), with one
    line saying which and why. Both loaders hand out the same stream, a function of the step: a run resumes
    with either, at any world size (`saved`, `ckpt_path`: the checkpoint resumed, to say so when it changes)."""
    kind, why = resolve_loader(cfg.data.loader, getattr(pairs, "checked", None), device)
    if saved is not None and saved.data_loader != kind:
        why += f"; checkpoint {ckpt_path} was made with the {saved.data_loader} loader, which hands out the same crops"
    if announce:
        log.info(f"data loader: {kind} ({why})")
    return make_train_loader(
        cfg,
        pairs,
        global_batch=global_batch,
        accum=accum,
        world=world,
        rank=rank,
        start_step=start_step,
        device=device,
        loader=kind,
    )
