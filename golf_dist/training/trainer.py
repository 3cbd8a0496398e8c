"""Trainer: one stage of the Golf Optimizer trained as configured, in parts a reader finds by name.

setup()       Accelerate, every check that can fail (batch split, F weights, VGG weights, data, the
              loader a resumed run needs), the networks, resume(); the tracking run starts last
resume()      the checkpoint every rank loads: weights, Adam, schedule, EMA, RNG, data position
train_step()  one optimizer step (accumulated micro-batches)
validate()    PSNR on the validation split, after F and after each G iteration
save()        an atomic checkpoint that every rank can resume from
export()      the final and best weights, the run record
close()       ends the MLflow run with the status the run ended in, also on an exception
train()       all of it; train_stage(cfg, stage) is the one call the command line makes
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from golf_dist import __version__
from golf_dist.checkpoints import (
    best_checkpoint,
    exported_weights,
    load_into,
    prune,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from golf_dist.config import Config, flatten, to_dict
from golf_dist.data.split_check import check_crop_fits, open_pairs
from golf_dist.data.torch_loader import unwrapped_errors
from golf_dist.errors import ConfigError, GolfError
from golf_dist.evaluation.validation import evaluate_pairs
from golf_dist.files import sha256_file, write_atomic
from golf_dist.log import get_logger
from golf_dist.losses import GolfLoss, find_vgg_weights, load_vgg_features, vgg_weights_missing_message
from golf_dist.models import f_net
from golf_dist.perf.speed import apply_backend_flags, prepare_input, warn_if_bf16_is_slow
from golf_dist.perf.speed import resolve as resolve_speed
from golf_dist.tracking import Tracker, redact_config_dict
from golf_dist.training.backend import NonFiniteSteps, make_accelerator, make_backend
from golf_dist.training.meter import StepMeter
from golf_dist.training.optim import EMA, make_scheduler
from golf_dist.training.preemption import StopCheck, print_stopped
from golf_dist.training.resume import (
    StagePaths,
    clean_leftovers,
    f_weights_record,
    open_train_loader,
    resolve_f_weights,
    resume_checkpoint,
    resume_from_checkpoint,
)
from golf_dist.training.run_info import run_params
from golf_dist.training.speed_check import make_optimizer, prepare_stage, record_fallbacks
from golf_dist.training.stages import FStage, GStage
from golf_dist.training.state import TrainingState
from golf_dist.training.watchdog import LONG_ALLOWANCE, Watchdog

log = get_logger(__name__)


def train_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Train one stage as configured; resume from the newest checkpoint of the stage if there is one."""
    return Trainer(cfg, stage).train()


class Trainer:
    def __init__(self, cfg: Config, stage: str):
        self.cfg, self.t, self.stage_name = cfg, cfg.train, stage
        self.paths = StagePaths(Path(cfg.output_dir), stage)
        self.tracker: Tracker | None = None
        self.last_val: tuple[int, float] | None = None  # (step, PSNR) of the latest validation
        self.best_psnr = -math.inf
        self._closed = False

    # ---- set-up: every check before any work, the tracking run last ----------------------------------

    def setup(self) -> None:
        self._start_accelerator()
        self._check_inputs()
        self._build()
        self.resume()
        self._open_loader()
        self._start_tracking()

    def _start_accelerator(self) -> None:
        self.accelerator = acc = make_accelerator(self.cfg)
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        self.device = acc.device

    def _check_inputs(self) -> None:
        cfg = self.cfg
        self.global_batch, self.accum = cfg.data.batch_size, self.t.grad_accum
        if self.global_batch % (self.world * self.accum):
            raise ConfigError(
                f"config key 'data.batch_size'={self.global_batch} (the global batch) must divide evenly across "
                f"{self.world} process(es) x train.grad_accum={self.accum}"
            )
        self.per_device = self.global_batch // (self.world * self.accum)
        self.f_path = resolve_f_weights(cfg, self.paths.output_dir) if self.stage_name == "g" else None
        self.vgg = None
        if cfg.loss.perceptual_weight > 0:
            vgg_path = find_vgg_weights(cfg.loss.vgg_weights)
            if vgg_path is None:
                raise GolfError(vgg_weights_missing_message())
            self.vgg = load_vgg_features(vgg_path)
        # every training sample's tar entry and image header checked; bad ones raise or (skip) are left out
        self.train_pairs = open_pairs(
            cfg.data.shards, cfg.data.train_split, cfg.data.on_bad_sample, cfg.data.cache_dir, min_side=cfg.data.crop
        )
        # the validation split too, its frames decoded: a corrupt one is found now, not at a validation step
        self.val_pairs = open_pairs(
            cfg.data.shards, cfg.data.val_split, cfg.data.on_bad_sample, cfg.data.cache_dir, decoded=cfg.val.max_pairs
        )
        check_crop_fits(cfg.data.crop, self.train_pairs, self.val_pairs)

    def _build(self) -> None:
        cfg, t = self.cfg, self.t
        torch.manual_seed(cfg.seed)
        # the speed layer (golf_dist/perf/speed.py): all off on a CPU; on a GPU compile, channels_last, TF32, fused Adam
        self.speed = resolve_speed(cfg.speed, self.device, training=True)
        apply_backend_flags(self.speed)
        stage_class = FStage if self.stage_name == "f" else GStage
        model = stage_class.network().to(self.device)  # before F is loaded: the seed alone decides the weights
        loss_fn = GolfLoss(cfg.loss.perceptual_weight, self.vgg, cfg.loss.content).to(self.device)
        f_model = None
        if stage_class is GStage:
            f_model = load_into(f_net(), self.f_path, "F").requires_grad_(False).eval().to(self.device)
        # fused InstanceNorm + ReLU, channels_last, compile (G compiled once: every unrolled, checkpointed step
        # calls the same graph); the compiled wrapper hands Adam the network's own parameters
        networks = [f_model, model] if f_model is not None else [model]  # F, then G: each fed the previous output
        self.speed, self.speed_fallbacks, networks = prepare_stage(self, self.speed, networks, loss_fn)
        model = networks[-1]
        if stage_class is FStage:
            self.stage: FStage | GStage = FStage(loss_fn)
        else:
            self.stage = GStage(
                loss_fn, networks[0], t.unroll, t.gradient_checkpointing, cfg.eval.iterations, t.unroll_weighting
            )
        # Adam; fused where on, its step checked first on a copy of the weights (golf_dist/training/speed_check.py)
        optimizer = make_optimizer(self, model)
        self.scheduler = make_scheduler(optimizer, t)  # warm-up, then exp | cosine | constant (training/optim.py)
        self.backend = make_backend(
            self.accelerator,
            model,
            optimizer,
            accum=self.accum,
            grad_clip=t.grad_clip,
            per_device=self.per_device,
            global_batch=self.global_batch,
            device=self.device,
        )
        self.mixed_precision = self.accelerator.mixed_precision  # the launcher's or DeepSpeed's JSON's; cfg unchanged
        # the weights' moving average: validation, the best-checkpoint choice and the exports use it when on
        self.ema = EMA(self.backend.raw_model, t.ema_decay) if t.ema_decay > 0 else None
        if self.backend.describe():
            log.info(self.backend.describe())
        warn_if_bf16_is_slow(self.mixed_precision, self.device)

    def resume(self) -> None:
        """Start from step 0, or from the checkpoint every rank agrees on (the stage's newest that loads, else
        train.resume_from)."""
        paths, t = self.paths, self.t
        if self.is_main:  # what a killed or disk-full writer left under a temporary name (before this run writes)
            clean_leftovers(paths)
        self.accelerator.wait_for_everyone()
        self.start_step, self.run_id, self.resumed_from = 0, None, None
        self.ckpt_path: Path | None = None
        self.saved: TrainingState | None = None  # the state of the checkpoint resumed from
        # rank 0 picks the checkpoint, every rank loads that one (or all stop naming it and the rank that cannot)
        ckpt = resume_checkpoint(paths.checkpoints, self.rank, self.world, t.resume_unverified)
        if ckpt is None and t.resume_from:
            # The stage's own newest checkpoint wins (a requeued job goes on from there); otherwise start from
            # train.resume_from: a local checkpoint or an MLflow artifact URI, downloaded and verified. Rank 0
            # picks the checkpoint, each rank fetches its own copy of that one (no shared filesystem assumed);
            # the MLflow run is a new one, tagged with it.
            ckpt = resume_from_checkpoint(
                t.resume_from, paths.stage_dir, self.cfg.tracking.uri, self.rank, self.world, t.resume_unverified
            )
            self.resumed_from = str(ckpt["path"])
            if ckpt["state"].get("stage") not in (None, self.stage_name):
                raise ConfigError(
                    f"train.resume_from={self.resumed_from} is a checkpoint of stage "
                    f"{ckpt['state']['stage']}, not {self.stage_name}"
                )
        if ckpt is not None:
            self._load(ckpt)
        if self.start_step > t.steps:
            raise ConfigError(f"checkpoint {self.ckpt_path} is at step {self.start_step}, beyond train.steps={t.steps}")

    def _load(self, ckpt: dict[str, Any]) -> None:
        """Weights, Adam, schedule, EMA, RNG and the run's place from a loaded checkpoint."""
        state = TrainingState.from_json(ckpt["state"], source=f"{ckpt['path']}/state.json")
        self.ckpt_path, self.saved = ckpt["path"], state
        # checkpoints hold Adam's plain layout whoever wrote them (DeepSpeed scatters it into ZeRO's partitions)
        self.backend.load(ckpt["model"], ckpt["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(
                    ckpt["ema"], state.ema_updates if state.ema_updates is not None else state.step
                )
            else:  # EMA switched on for a run that had none: start the average at the resumed weights
                self.ema = EMA(self.backend.raw_model, self.t.ema_decay)
                log.info(
                    f"train.ema_decay={self.t.ema_decay}: checkpoint {ckpt['path']} has no EMA; it starts "
                    "from the resumed weights"
                )
        set_rng_state(ckpt["rng"])
        self.start_step = state.step
        self.run_id = state.mlflow_run_id if self.resumed_from is None else None
        self.best_psnr = state.best
        if state.global_batch not in (None, self.global_batch):
            raise ConfigError(
                f"checkpoint {ckpt['path']} was made with data.batch_size={state.global_batch}; "
                f"resuming with {self.global_batch} would change the data order. Use the same global batch "
                "or a new --output-dir"
            )
        log.info(f"resuming stage {self.stage_name} from {ckpt['path']} (step {self.start_step} of {self.t.steps})")

    def _open_loader(self) -> None:
        self.loader = open_train_loader(
            self.cfg,
            self.train_pairs,
            self.saved if self.start_step > 0 else None,
            self.ckpt_path,
            global_batch=self.global_batch,
            accum=self.accum,
            world=self.world,
            rank=self.rank,
            start_step=self.start_step,
            device=self.device,
            announce=self.is_main,
        )
        self.batches = unwrapped_errors(self.loader)  # a worker's error re-raised with its message alone

    def _start_tracking(self) -> None:
        """The MLflow run (main process only): new, or continued after a resume; params on a new one."""
        cfg, paths, stage = self.cfg, self.paths, self.stage_name
        record = to_dict(cfg, {"train.mixed_precision": self.mixed_precision})  # the config as run, as a record
        resolved_yaml = yaml.safe_dump(redact_config_dict(record), sort_keys=False)  # passwords in URIs -> ***
        if self.is_main:
            paths.stage_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(paths.stage_dir / "config.yaml", resolved_yaml.encode())
        tags = {"golf.stage": stage, "golf.output_dir": str(paths.output_dir.resolve())}
        if self.resumed_from:
            tags["golf.resumed_from"] = self.resumed_from
        # what the speed layer's start-up check turned off: speed_fallback.json and an MLflow tag
        tags.update(record_fallbacks(self.speed_fallbacks, paths.stage_dir, self.is_main))
        f_info = f_weights_record(paths.output_dir, self.f_path) if stage == "g" else {}
        if stage == "g":
            tags["golf.f_run_id"] = f_info.get("f_run_id", "")
        self.tracker = Tracker(
            self.is_main, cfg.tracking.uri, cfg.tracking.experiment, metrics_file=paths.stage_dir / "metrics.jsonl"
        )
        self.tracker.start(run_name=f"{stage}-{paths.output_dir.name}", resume_run_id=self.run_id, tags=tags)
        if self.start_step == 0 or self.tracker.new_run:  # a new MLflow run (also one resumed from elsewhere)
            self.tracker.log_params(
                {
                    **flatten(record),
                    "stage": stage,
                    "per_device_batch": self.per_device,
                    "global_batch": self.global_batch,
                    "grad_accum": self.accum,
                    "device": str(self.device),
                    **f_info,
                    **run_params(self.accelerator),
                }
            )
            self.tracker.log_text(resolved_yaml, "config.yaml")
        log.info(
            f"stage {stage}: {self.t.steps} steps, global batch {self.global_batch} = {self.world} process(es) x "
            f"{self.per_device} per device x {self.accum} accumulation, crop {cfg.data.crop}, device {self.device} "
            f"({self.speed.describe()})"
            + self.stage.describe()
            + ("" if self.vgg is not None else ", perceptual term off (loss.perceptual_weight=0)")
        )

    # ---- the loop ------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        self.setup()
        with Watchdog(
            self.t.hang_timeout_s,
            self.rank,
            self.paths.stage_dir,  # a stuck rank: exit 124, its
            lambda: self.close("FAILED"),
        ) as self.watchdog:  # MLflow run ended as FAILED first (best effort)
            try:
                stopped = self._run_steps()
                self.watchdog.beat("the export" if not stopped else "the preemption stop", LONG_ALLOWANCE)
                return self._stop_for_preemption(*stopped) if stopped else self.export()
            except BaseException as err:
                self.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
                raise

    def _run_steps(self) -> tuple[int, str, StopCheck] | None:
        """Steps from the resumed one to train.steps; (step, reason, stop check) when asked to stop early."""
        t, acc = self.t, self.accelerator
        stop = StopCheck(self.paths.stage_dir, self.world, self.is_main)  # SIGUSR2/SIGTERM or the STOP file
        acc.wait_for_everyone()  # a leftover STOP file is gone before any rank looks for one
        self.backend.model.train()
        self.meter = StepMeter(
            self.device,
            self.global_batch,
            (lambda x: acc.reduce(x, "mean")) if self.world > 1 else None,
            world=self.world,
        )
        bar = tqdm(
            total=t.steps,
            initial=self.start_step,
            desc=f"stage {self.stage_name}",
            disable=not self.is_main,
            dynamic_ncols=True,
        )
        self.nonfinite = NonFiniteSteps(t, self.backend.skips_nonfinite, self.paths.checkpoints, self.rank)
        try:
            for step in range(self.start_step + 1, t.steps + 1):
                self.watchdog.beat(f"step {step}", LONG_ALLOWANCE if step == self.start_step + 1 else 1.0)
                self.train_step(step)
                bar.update(1)
                if step % t.log_every == 0 or step == t.steps:
                    self._log_window(step, bar)
                self.watchdog.beat(f"validation, checkpoint or stop check after step {step}", LONG_ALLOWANCE)
                with self.meter.paused_time():  # validation and checkpoints do not count as training time
                    if step % t.val_every == 0 or step == t.steps:
                        self.last_val = (step, self.validate(step))
                        self.best_psnr = max(self.best_psnr, self.last_val[1])
                    if step % t.checkpoint_every == 0 or step == t.steps:
                        self.save(step)
                # preemption: every rank agrees at this boundary, checkpoints this step, then leaves the loop
                if step < t.steps and (reason := stop.requested()) is not None:
                    if step % t.checkpoint_every:
                        self.save(step)
                    return step, reason, stop
        finally:
            bar.close()
        stop.clear_marker()
        return None

    def train_step(self, step: int) -> None:
        """Optimizer step `step`: `accum` micro-batches forward and backward, the step (a NaN/Inf one skipped), EMA."""
        for micro in range(self.accum):
            with self.meter.waiting_for_data():
                blur, sharp = next(self.batches)
            blur, sharp = blur.to(self.device, non_blocking=True), sharp.to(self.device, non_blocking=True)
            blur, sharp = prepare_input(blur, self.speed), prepare_input(sharp, self.speed)
            losses = self.backend.micro_step(
                lambda blur=blur, sharp=sharp: self.stage.loss(self.backend.model, blur, sharp),
                last=micro == self.accum - 1,
            )
            self.meter.add_losses(losses, self.accum)
        norm, finite = self.backend.finish_step(self.meter.step_loss())
        self.nonfinite.check(step, finite, self.meter.step_loss(), norm)  # counts a skipped step, or stops the run
        self.meter.add_step(norm, taken=finite)
        self.scheduler.step()  # skipped steps too: the lr is a function of the step count (docs/training.md)
        if finite and self.ema is not None:
            self.ema.update(self.backend.raw_model)

    def _log_window(self, step: int, bar) -> None:
        metrics = self.meter.window(step)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        # bad samples: those left out at start-up (the same on every rank) + those skipped while loading
        skipped = torch.tensor(float(self.loader.skipped_runtime), dtype=torch.float64, device=self.device)
        if self.world > 1:
            skipped = self.accelerator.reduce(skipped, "sum")
        metrics["bad_samples_skipped"] = self.loader.excluded + skipped.item()
        if step == self.t.steps and metrics["bad_samples_skipped"]:
            log.info(
                f"skipped {int(metrics['bad_samples_skipped'])} bad training sample(s) "
                "(data.on_bad_sample=skip; MLflow metric bad_samples_skipped)"
            )
        self.tracker.log_metrics(metrics, step)
        bar.set_postfix(loss=f"{metrics['loss']:.5f}", crops_s=f"{metrics['crops_per_s']:.1f}")

    def validate(self, step: int) -> float:
        """Validation PSNR after F and each G iteration, logged as series; returns the one after
        eval.iterations (the test-time count), which picks the best checkpoint."""
        cfg, model = self.cfg, self.backend.model
        iterations = self.stage.val_iterations
        shown = min(cfg.eval.iterations, iterations)
        model.eval()
        trained = self.ema.module if self.ema is not None else self.backend.raw_model
        f_eval, g_eval = self.stage.eval_networks(trained)
        with torch.no_grad():
            result = evaluate_pairs(
                f_eval,
                g_eval,
                self.val_pairs,
                iterations,
                self.device,
                self.rank,
                self.world,
                reduce_sum=(lambda x: self.accelerator.reduce(x, "sum")) if self.world > 1 else None,
                limit=cfg.val.max_pairs,
                with_ssim=False,
                samples=cfg.val.sample_images if self.is_main else 0,
                autocast=self.backend.autocast,
                sample_iteration=shown,
            )
        model.train()
        per_iteration = result["psnr_per_iteration"]
        metrics = {
            "val_psnr": per_iteration[shown],
            "val_input_psnr": result["input_psnr"],
            "val_bad_samples_skipped": float(self.val_pairs.checked.n_bad),
        }  # left out at start-up (skip)
        metrics.update({f"val_psnr_iter_{i}": v for i, v in enumerate(per_iteration)})
        self.tracker.log_metrics(metrics, step)
        for key, image in result["samples"]:
            self.tracker.log_image(image, f"samples/step-{step:08d}/{key}.png")
        if self.is_main:
            gains = ", ".join(f"{v - result['input_psnr']:+.2f}" for v in per_iteration)
            log.info(
                f"step {step}: val PSNR {per_iteration[shown]:.2f} dB (input {result['input_psnr']:.2f}; gain "
                f"after {'F and each G iteration' if g_eval is not None else 'F'}: {gains} dB)"
            )
        return per_iteration[shown]

    def save(self, step: int) -> None:
        """Checkpoint after optimizer step `step` (main process writes; every rank waits for it)."""
        model_state, optimizer_state = self.backend.full_state()  # a collective under DeepSpeed
        if self.is_main:
            state = TrainingState(
                stage=self.stage_name,
                steps=self.t.steps,
                step=step,
                data_position=step * self.global_batch,
                global_batch=self.global_batch,
                world_size=self.world,
                val_psnr=self.last_val[1] if self.last_val and self.last_val[0] == step else None,
                best_val_psnr=self.best_psnr if self.best_psnr > -math.inf else None,
                mlflow_run_id=self.tracker.run_id,
                data_loader=self.loader.kind,
                ema_updates=self.ema.updates if self.ema is not None else None,
            )
            written = save_checkpoint(
                self.paths.checkpoints,
                step,
                model_state,
                {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()},
                state.to_json(),
                ema_state=self.ema.state_dict() if self.ema is not None else None,
            )
            pruned = prune(self.paths.checkpoints, self.t.keep_last)  # never the newest
            if self.cfg.tracking.log_checkpoints:  # a copy in the run's artifact store (resume from it elsewhere)
                self.tracker.log_artifacts(written, f"checkpoints/{written.name}")
                self.tracker.delete_artifacts([f"checkpoints/{path.name}" for path in pruned])  # go with the local
        self.accelerator.wait_for_everyone()

    # ---- the end -------------------------------------------------------------------------------------

    def _stop_for_preemption(self, step: int, reason: str, stop: StopCheck) -> dict[str, Any]:
        ckpt_path = self.paths.checkpoints / f"step-{step:08d}"
        stop.write_marker(step, self.t.steps, reason, ckpt_path)
        if self.is_main:
            self.tracker.set_tags({"golf.preempted_at_step": str(step)})
            self.close("KILLED")
            print_stopped(self.stage_name, step, self.t.steps, reason, ckpt_path)
        self.accelerator.wait_for_everyone()
        return {
            "stage": self.stage_name,
            "steps": self.t.steps,
            "preempted": True,
            "step": step,
            "checkpoint": str(ckpt_path),
        }

    def export(self) -> dict[str, Any]:
        """The final weights (the EMA when on), the best checkpoint's, the run record; ends the run."""
        paths, stage = self.paths, self.stage_name
        result: dict[str, Any] = {"stage": stage, "steps": self.t.steps, "weights": str(paths.weights)}
        final_weights = self.backend.final_weights()  # fp32; a collective under DeepSpeed
        if self.ema is not None:
            final_weights = self.ema.state_dict()
        if self.is_main:
            meta = {
                "stage": stage,
                "steps": str(self.t.steps),
                "golf_dist": __version__,
                "weights": "ema" if self.ema is not None else "trained",
            }
            save_weights(final_weights, paths.weights, meta)
            best = best_checkpoint(paths.checkpoints)
            if best is not None:  # the EMA weights when the run kept one: what validation scored
                save_weights(exported_weights(best), paths.best_weights, meta)
                self.tracker.log_artifact(paths.best_weights, "weights")
            self.tracker.log_artifact(paths.weights, "weights")
            info = {
                "mlflow_run_id": self.tracker.run_id,
                "tracking_uri": self.tracker.display_uri,
                "weights_sha256": sha256_file(paths.weights),
            }
            write_atomic(paths.run_info, json.dumps(info, indent=2).encode())
            if self.last_val is not None:
                result["val_psnr"] = self.last_val[1]
            result.update(best_val_psnr=self.best_psnr if self.best_psnr > -math.inf else None, **info)
            self.close()  # also prints what could not be logged (counted by kind), if anything
            result["tracking_failures"] = dict(self.tracker.failed)
            log.info(
                f"stage {stage} done: weights {paths.weights}; MLflow run {self.tracker.run_id} at "
                f"{self.tracker.display_uri}"
            )
        self.accelerator.wait_for_everyone()
        return result

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run once, as FINISHED, KILLED (preempted, interrupted) or FAILED (an exception)."""
        if self.tracker is not None and self.is_main and not self._closed:
            self._closed = True
            self.tracker.end(status)
