"""The training loop of both stages.

Stage f trains F alone: L(F(y), x~). Stage g loads the trained F, freezes it (kept out of
`accelerator.prepare`, so DDP and DeepSpeed see one model), computes x0 = F(y) on the same crop and
minimises the mean of L(G^(i)(x0), x~) over i = 1..N (Eq. 4), each unrolled step checkpointed.

Layout of an output directory:
    DIR/f/config.yaml, DIR/f/checkpoints/step-XXXXXXXX/   stage f (resolved config, checkpoints)
    DIR/f.safetensors, DIR/f_best.safetensors, DIR/f_run.json   exported weights + MLflow run id
    DIR/g/..., DIR/g.safetensors, DIR/g_best.safetensors, DIR/g_run.json
A run started on a directory that holds checkpoints of its stage resumes from the newest one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from golf_dist import __version__
from golf_dist.checkpoints import (
    best_checkpoint,
    clean_stale_temporaries,
    exported_weights,
    list_checkpoints,
    load_into,
    load_latest,
    prune,
    read_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from golf_dist.config import Config, flatten, to_dict
from golf_dist.data.dali import make_train_loader, open_pairs, resolve_loader
from golf_dist.data.loader import ShardPairs, unwrap_worker_error
from golf_dist.data.shard_reader import sha256_file
from golf_dist.data.storage import write_atomic
from golf_dist.errors import ConfigError, DataError, GolfError
from golf_dist.evaluate import evaluate_pairs
from golf_dist.losses import GolfLoss, find_vgg_weights, load_vgg_features, unrolled_loss, vgg_weights_missing_message
from golf_dist.models import f_net, g_net, unroll
from golf_dist.optim import EMA, clip_gradients, make_scheduler
from golf_dist.preemption import StopCheck, print_stopped
from golf_dist.run_info import run_params
from golf_dist.tracking import Tracker, redact_config_dict


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
        state = read_state(f_ckpts[-1])
        raise DataError(
            f"stage g needs a trained F, but stage f in {output_dir} has not finished "
            f"(newest checkpoint: step {state.get('step')} of {state.get('steps')}); "
            f"let it finish (rerun stage f with the same --output-dir to resume) or set train.f_weights=PATH"
        )
    raise DataError(
        f"stage g needs a trained F: {path} does not exist. Train it first with "
        f"`launch/train.py --stage f --output-dir {output_dir}` (same config), or set train.f_weights=PATH"
    )


def resume_checkpoint(folder: Path, rank: int, world: int) -> dict[str, Any] | None:
    """The checkpoint of `folder` that every rank resumes from, loaded, or None to start from step 0.

    The main rank (rank 0) chooses: the newest checkpoint that loads (`load_latest`: a damaged newer one is
    skipped, with one warning). It sends the folder's name to the other ranks, and each loads that very
    checkpoint, not the newest one it sees itself (a file system cache, or one rank falling back past a
    damaged checkpoint, would otherwise start ranks from different steps and weights). When a rank cannot
    load it, every rank raises the same DataError naming the chosen checkpoint, the rank and why; no rank is
    left waiting in a collective. A collective: every rank calls it once."""
    import torch.distributed as dist

    from golf_dist.checkpoints import load_checkpoint

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return load_latest(folder)
    ckpt, own_error, error = None, None, None
    if rank == 0:
        try:
            ckpt = load_latest(folder)
        except Exception as err:  # the others wait for rank 0's choice: they must hear of this too
            own_error, error = err, f"{type(err).__name__}: {err}"
    choice = [None if ckpt is None else ckpt["path"].name, None if ckpt is None else str(ckpt["path"]), error]
    dist.broadcast_object_list(choice, src=0)
    name, chosen, error = choice
    if error is not None:
        if own_error is not None:
            raise own_error
        raise DataError(f"rank {rank}: rank 0 could not choose a checkpoint to resume from in {folder}: {error}")
    if rank != 0 and name is not None:
        path = Path(folder) / name
        try:
            ckpt = load_checkpoint(path)
            ckpt["path"] = path
        except Exception as err:
            error = f"{path}: {err}"
    failures: list[str | None] = [None] * world
    dist.all_gather_object(failures, error)
    failed = [(r, why) for r, why in enumerate(failures) if why is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise DataError(
            f"rank 0 resumes from checkpoint {chosen}, but rank(s) {ranks} cannot load it ("
            + "; ".join(f"rank {r}: {why}" for r, why in failed)
            + "). Every rank must resume from the same checkpoint: OUTPUT_DIR must be one file system that "
            "every node sees the same (shared, and not stale in a cache)"
        )
    return ckpt


def train_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Train one stage as configured; resume from the newest checkpoint of the stage if there is one."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from golf_dist import distributed as dist_utils

    # bf16 asked for by the launch config (configs/accelerate/*.yaml) counts as well as train.mixed_precision
    cfg.train.mixed_precision = dist_utils.resolve_mixed_precision(cfg.train.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            # a hung rank fails the collectives after GOLF_DIST_TIMEOUT_S instead of blocking the others
            InitProcessGroupKwargs(timeout=dist_utils.process_group_timeout()),
        ],
    )
    use_ds = dist_utils.is_deepspeed(accelerator)  # DeepSpeed: it accumulates, steps and partitions Adam itself
    autocast = accelerator.autocast  # under DeepSpeed bf16: torch's bf16 autocast (set before prepare)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    paths = StagePaths(Path(cfg.output_dir), stage)
    t = cfg.train

    # ---- every check that can fail happens before any work -------------------------------------------
    global_batch, accum = cfg.data.batch_size, t.grad_accum
    if global_batch % (world * accum):
        raise ConfigError(
            f"config key 'data.batch_size'={global_batch} (the global batch) must divide evenly across "
            f"{world} process(es) x train.grad_accum={accum}"
        )
    per_device = global_batch // (world * accum)
    f_path = resolve_f_weights(cfg, paths.output_dir) if stage == "g" else None
    vgg = None
    if cfg.loss.perceptual_weight > 0:
        vgg_path = find_vgg_weights(cfg.loss.vgg_weights)
        if vgg_path is None:
            raise GolfError(vgg_weights_missing_message())
        vgg = load_vgg_features(vgg_path)
    # every training sample's tar entry and image header checked; bad ones raise or (skip) are left out
    train_pairs = open_pairs(cfg.data.shards, cfg.data.train_split, cfg.data.on_bad_sample, cfg.data.cache_dir,
                             min_side=cfg.data.crop)
    val_pairs = ShardPairs(cfg.data.shards, cfg.data.val_split, cfg.data.cache_dir)
    for pairs in (train_pairs, val_pairs):
        size = pairs.frame_size
        if size is not None and min(size) < cfg.data.crop:
            raise ConfigError(
                f"config key 'data.crop'={cfg.data.crop} is larger than the {size[0]}x{size[1]} frames of "
                f"split '{pairs.split}' in {pairs.shard_dir}"
            )

    # ---- models, optimizer, resume -------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = f_net() if stage == "f" else g_net()
    f_model = None
    if stage == "g":
        f_model = load_into(f_net(), f_path, "F").requires_grad_(False).eval().to(device)
    loss_fn = GolfLoss(cfg.loss.perceptual_weight, vgg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2))
    scheduler = make_scheduler(optimizer, t)  # warm-up, then exp | cosine | constant (golf_dist.optim)
    if use_ds:
        ds_config = dist_utils.configure_deepspeed(accelerator, per_device, accum, global_batch, t.grad_clip)
        autocast = dist_utils.deepspeed_autocast(ds_config, device) or autocast
        cfg.train.mixed_precision = accelerator.mixed_precision  # the JSON's bf16 setting, for the logs
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    # the weights' moving average: validation, the best-checkpoint choice and the exports use it when on
    ema = EMA(raw_model, t.ema_decay) if t.ema_decay > 0 else None
    if use_ds and is_main:
        print(f"DeepSpeed ZeRO stage {ds_config['zero_optimization'].get('stage', 0)} "
              f"({type(optimizer.optimizer).__name__}), mixed precision {accelerator.mixed_precision}", flush=True)

    if is_main:  # what a killed or disk-full writer left under a temporary name (before this run writes)
        for stale in clean_stale_temporaries(paths.checkpoints) + clean_stale_temporaries(paths.output_dir):
            print(f"removed the leftover {stale} of an earlier run", flush=True)
    accelerator.wait_for_everyone()
    start_step, run_id, best_psnr = 0, None, -math.inf
    saved_loader, reader_states = None, None  # the data loader of the checkpoint and its DALI reader states
    # rank 0 picks the checkpoint, every rank loads that one (or all stop naming it and the rank that cannot)
    ckpt, resumed_from = resume_checkpoint(paths.checkpoints, rank, world), None
    if ckpt is None and t.resume_from:
        # The stage's own newest checkpoint wins (a requeued job goes on from there); otherwise start from
        # train.resume_from: a local checkpoint or an MLflow artifact URI, downloaded and verified. Each rank
        # fetches its own copy (no shared filesystem assumed); the MLflow run is a new one, tagged with it.
        from golf_dist.remote import load_resume_checkpoint

        ckpt = load_resume_checkpoint(t.resume_from, paths.stage_dir, cfg.tracking.uri)
        resumed_from = str(ckpt["path"])
        if ckpt["state"].get("stage") not in (None, stage):
            raise ConfigError(
                f"train.resume_from={resumed_from} is a checkpoint of stage {ckpt['state']['stage']}, not {stage}"
            )
    if ckpt is not None:
        if use_ds:  # checkpoints hold Adam's plain layout (see save): scatter it into ZeRO's partitions
            dist_utils.load_full_state(raw_model, optimizer, ckpt["model"], ckpt["optimizer"]["optimizer"])
        else:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
        scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
        if ema is not None:
            if ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"], ckpt["state"].get("ema_updates", int(ckpt["state"]["step"])))
            else:  # EMA switched on for a run that had none: start the average at the resumed weights
                ema = EMA(raw_model, t.ema_decay)
                if is_main:
                    print(f"train.ema_decay={t.ema_decay}: checkpoint {ckpt['path']} has no EMA; it starts "
                          "from the resumed weights", flush=True)
        set_rng_state(ckpt["rng"])
        start_step = int(ckpt["state"]["step"])
        run_id = ckpt["state"].get("mlflow_run_id") if resumed_from is None else None
        best_psnr = ckpt["state"].get("best_val_psnr", -math.inf) or -math.inf
        saved_loader = ckpt["state"].get("data_loader", "torch")  # checkpoints before DALI: torch
        reader_states = ckpt["state"].get("dali_reader_states")
        if ckpt["state"].get("global_batch") not in (None, global_batch):
            raise ConfigError(
                f"checkpoint {ckpt['path']} was made with data.batch_size={ckpt['state']['global_batch']}; "
                f"resuming with {global_batch} would change the data order. Use the same global batch "
                "or a new --output-dir"
            )
        if is_main:
            print(f"resuming stage {stage} from {ckpt['path']} (step {start_step} of {t.steps})", flush=True)
    if start_step > t.steps:
        raise ConfigError(f"checkpoint {ckpt['path']} is at step {start_step}, beyond train.steps={t.steps}")

    # ---- tracking (main process only) ----------------------------------------------------------------
    # the resolved config as a record, passwords in URIs (tracking.uri, s3 endpoints) replaced by ***
    resolved_yaml = yaml.safe_dump(redact_config_dict(to_dict(cfg)), sort_keys=False)
    if is_main:
        paths.stage_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(paths.stage_dir / "config.yaml", resolved_yaml.encode())
    tracker = Tracker(is_main, cfg.tracking.uri, cfg.tracking.experiment, metrics_file=paths.stage_dir / "metrics.jsonl")
    tags = {"golf.stage": stage, "golf.output_dir": str(paths.output_dir.resolve())}
    if resumed_from:
        tags["golf.resumed_from"] = resumed_from
    f_info: dict[str, str] = {}
    if stage == "g":
        f_info = {"f_weights": str(f_path.resolve()), "f_weights_sha256": sha256_file(f_path)}
        f_run_file = StagePaths(paths.output_dir, "f").run_info
        if f_run_file.is_file():
            f_info["f_run_id"] = json.loads(f_run_file.read_text()).get("mlflow_run_id") or ""
        tags["golf.f_run_id"] = f_info.get("f_run_id", "")
    tracker.start(run_name=f"{stage}-{paths.output_dir.name}", resume_run_id=run_id, tags=tags)
    if start_step == 0 or tracker.new_run:  # a new MLflow run (also one resumed from elsewhere) gets the params
        tracker.log_params(
            {
                **flatten(to_dict(cfg)),
                "stage": stage,
                "per_device_batch": per_device,
                "global_batch": global_batch,
                "grad_accum": accum,
                "device": str(device),
                **f_info,
                **run_params(accelerator),
            }
        )
        tracker.log_text(resolved_yaml, "config.yaml")
    if is_main:
        print(
            f"stage {stage}: {t.steps} steps, global batch {global_batch} = {world} process(es) x "
            f"{per_device} per device x {accum} accumulation, crop {cfg.data.crop}, device {device}"
            + (f", unroll {t.unroll} (checkpointing {'on' if t.gradient_checkpointing else 'off'})" if stage == "g" else "")
            + ("" if vgg is not None else ", perceptual term off (loss.perceptual_weight=0)"),
            flush=True,
        )

    # data.loader auto|dali|torch, with one line saying which and why. A DALI reader's position lives in its
    # pipeline checkpoint (one per rank), so a DALI resume needs the same loader and the same world size.
    if cfg.data.loader == "auto" and saved_loader == "torch" and start_step > 0:
        loader_kind, why = "torch", "data.loader=auto, and the checkpoint resumed was made with the torch loader"
    else:
        loader_kind, why = resolve_loader(cfg.data.loader, getattr(train_pairs, "checked", None), device)
    if saved_loader is not None and start_step > 0 and saved_loader != loader_kind:
        raise ConfigError(
            f"checkpoint {ckpt['path']} was made with data.loader={saved_loader}, this run uses {loader_kind} "
            f"({why}): resume with config key 'data.loader'={saved_loader}, or start a new --output-dir"
        )
    if loader_kind == "dali" and reader_states is not None and len(reader_states) != world:
        raise ConfigError(
            f"checkpoint {ckpt['path']} holds the DALI reader states of {len(reader_states)} process(es), this run "
            f"has {world}: a DALI run resumes exactly only at the same world size (or use data.loader=torch, "
            "whose order does not depend on it, for a new run)"
        )
    if is_main:
        print(f"data loader: {loader_kind} ({why})", flush=True)
    loader = make_train_loader(
        cfg, train_pairs, global_batch=global_batch, accum=accum, world=world, rank=rank, start_step=start_step,
        device=device, loader=loader_kind, reader_state=reader_states[rank] if reader_states else None,
    )
    batches = iter(loader)

    def step_loss(blur: torch.Tensor, sharp: torch.Tensor) -> dict[str, torch.Tensor]:
        if stage == "f":
            return loss_fn(model(blur), sharp)
        with torch.no_grad():
            x0 = f_model(blur)
        iterates = unroll(model, x0, t.unroll, checkpoint=t.gradient_checkpointing)
        return unrolled_loss(loss_fn, iterates, sharp, checkpoint=t.gradient_checkpointing)

    # Stage g validates over max(N, eval.iterations) G iterations and logs each as its own series
    # (val_psnr_iter_0 is F alone); val_psnr, which picks the best checkpoint, is the PSNR after
    # eval.iterations, the test-time count.
    val_iterations = max(t.unroll, cfg.eval.iterations) if stage == "g" else 0

    def validate(step: int) -> float:
        model.eval()
        trained = ema.module if ema is not None else raw_model
        with torch.no_grad():
            f_eval = trained if stage == "f" else f_model
            g_eval = trained if stage == "g" else None
            result = evaluate_pairs(
                f_eval, g_eval, val_pairs, val_iterations, device, rank, world,
                reduce_sum=(lambda x: accelerator.reduce(x, "sum")) if world > 1 else None,
                limit=cfg.val.max_pairs, with_ssim=False, samples=cfg.val.sample_images if is_main else 0,
                autocast=autocast, sample_iteration=min(cfg.eval.iterations, val_iterations),
            )
        model.train()
        per_iteration = result["psnr_per_iteration"]
        headline = per_iteration[min(cfg.eval.iterations, val_iterations)]
        metrics = {"val_psnr": headline, "val_input_psnr": result["input_psnr"]}
        metrics.update({f"val_psnr_iter_{i}": v for i, v in enumerate(per_iteration)})
        tracker.log_metrics(metrics, step)
        for key, image in result["samples"]:
            tracker.log_image(image, f"samples/step-{step:08d}/{key}.png")
        if is_main:
            gains = ", ".join(f"{v - result['input_psnr']:+.2f}" for v in per_iteration)
            tqdm.write(f"step {step}: val PSNR {headline:.2f} dB (input {result['input_psnr']:.2f}; gain after "
                       f"{'F and each G iteration' if stage == 'g' else 'F'}: {gains} dB)")
        return headline

    def save(step: int) -> None:
        """Checkpoint after optimizer step `step` (main process writes; every rank waits for it)."""
        # every rank's DALI reader state (position, shuffle and window generators) goes into state.json
        reader_state = loader.state()
        if reader_state is not None and world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, reader_state)
        else:
            gathered = [reader_state] if reader_state is not None else None
        # under DeepSpeed ZeRO-2 each rank holds a slice of Adam's state (and bf16 copies of the weights):
        # gather the fp32 weights and the whole state into the plain layout (a collective: every rank)
        ds_state = dist_utils.full_state(raw_model, optimizer) if use_ds else None
        if is_main:
            model_state, optimizer_state = ds_state or (raw_model.state_dict(), optimizer.state_dict())
            written = save_checkpoint(
                paths.checkpoints,
                step,
                model_state,
                {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                {
                    "stage": stage,
                    "steps": t.steps,
                    "data_position": step * global_batch,
                    "global_batch": global_batch,
                    "world_size": world,
                    "val_psnr": last_val[1] if last_val and last_val[0] == step else None,
                    "best_val_psnr": best_psnr if best_psnr > -math.inf else None,
                    "mlflow_run_id": tracker.run_id,
                    "data_loader": loader.kind,
                    "dali_reader_states": gathered,
                    "ema_updates": ema.updates if ema is not None else None,
                },
                ema_state=ema.state_dict() if ema is not None else None,
            )
            if cfg.tracking.log_checkpoints:  # a copy in the run's artifact store: resume from it elsewhere
                tracker.log_artifacts(written, f"checkpoints/{written.name}")
            prune(paths.checkpoints, t.keep_last)
        accelerator.wait_for_everyone()

    # ---- the loop ------------------------------------------------------------------------------------
    stop = StopCheck(paths.stage_dir, world, is_main)  # SIGUSR2/SIGTERM or the STOP file
    accelerator.wait_for_everyone()  # a leftover STOP file is gone before any rank looks for one
    stopped: tuple[int, str] | None = None
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # total, content, perceptual
    grad_norms = torch.zeros(2, dtype=torch.float64, device=device)  # sum and max of the window's norms
    window_steps, window_start, waited, paused = 0, time.perf_counter(), 0.0, 0.0
    last_val = None
    bar = tqdm(total=t.steps, initial=start_step, desc=f"stage {stage}", disable=not is_main, dynamic_ncols=True)
    for step in range(start_step + 1, t.steps + 1):
        for micro in range(accum):
            wait_start = time.perf_counter()
            try:
                blur, sharp = next(batches)
            except GolfError as err:
                raise unwrap_worker_error(err) from None
            waited += time.perf_counter() - wait_start
            blur, sharp = blur.to(device, non_blocking=True), sharp.to(device, non_blocking=True)
            sync = micro == accum - 1
            if use_ds:
                # the engine divides by accum, reduces and steps at its own accumulation boundary
                # (every accum-th call); Accelerate's no_sync does not apply to it
                with autocast():
                    losses = step_loss(blur, sharp)
                model.backward(losses["total"])
                model.step()
            else:
                with autocast():
                    if sync:
                        losses = step_loss(blur, sharp)
                        accelerator.backward(losses["total"] / accum)
                    else:
                        with accelerator.no_sync(model):
                            losses = step_loss(blur, sharp)
                            accelerator.backward(losses["total"] / accum)
            sums += torch.stack([losses[k].detach().double() for k in ("total", "content", "perceptual")]) / accum
        if use_ds:  # the engine clipped (gradient_clipping in its config) and stepped at the boundary
            norm = torch.as_tensor(float(model.get_global_grad_norm() or 0.0), dtype=torch.float64)
        else:
            if accelerator.scaler is not None:  # fp16: clip and measure the true gradients
                accelerator.unscale_gradients()
            norm = clip_gradients(model.parameters(), t.grad_clip).double()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        norm = norm.to(device)
        grad_norms[0] += norm
        grad_norms[1] = torch.maximum(grad_norms[1], norm)
        scheduler.step()
        if ema is not None:
            ema.update(raw_model)
        window_steps += 1
        bar.update(1)

        if step % t.log_every == 0 or step == t.steps:
            mean = (accelerator.reduce(sums, "mean") if world > 1 else sums) / window_steps
            elapsed = time.perf_counter() - window_start - paused
            metrics = {
                "loss": mean[0].item(),
                "loss_content": mean[1].item(),
                "loss_perceptual": mean[2].item(),
                "lr": scheduler.get_last_lr()[0],
                # the global gradient norm before clipping (the same on every rank after DDP's all-reduce)
                "grad_norm": grad_norms[0].item() / window_steps,
                "grad_norm_max": grad_norms[1].item(),
                "crops_per_s": window_steps * global_batch / elapsed,
                "data_wait_share": waited / elapsed,
            }
            # bad samples: those left out at start-up (the same on every rank) + those skipped while loading
            skipped = torch.tensor(float(loader.skipped_runtime), dtype=torch.float64, device=device)
            metrics["bad_samples_skipped"] = loader.excluded + (accelerator.reduce(skipped, "sum") if world > 1 else skipped).item()
            if step == t.steps and is_main and metrics["bad_samples_skipped"]:
                print(f"skipped {int(metrics['bad_samples_skipped'])} bad training sample(s) "
                      "(data.on_bad_sample=skip; MLflow metric bad_samples_skipped)", flush=True)
            tracker.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.5f}", crops_s=f"{metrics['crops_per_s']:.1f}")
            sums.zero_()
            grad_norms.zero_()
            window_steps, window_start, waited, paused = 0, time.perf_counter(), 0.0, 0.0

        pause_start = time.perf_counter()  # validation and checkpoints do not count as training time
        if step % t.val_every == 0 or step == t.steps:
            last_val = (step, validate(step))
            best_psnr = max(best_psnr, last_val[1])

        if step % t.checkpoint_every == 0 or step == t.steps:
            save(step)
        paused += time.perf_counter() - pause_start

        # preemption: every rank agrees at this boundary, checkpoints this step, then leaves the loop
        if step < t.steps and (reason := stop.requested()) is not None:
            if step % t.checkpoint_every:
                save(step)
            stopped = (step, reason)
            break
    bar.close()
    if stopped is not None:
        step, reason = stopped
        ckpt_path = paths.checkpoints / f"step-{step:08d}"
        stop.write_marker(step, t.steps, reason, ckpt_path)
        if is_main:
            tracker.set_tags({"golf.preempted_at_step": str(step)})
            tracker.end("KILLED")
            print_stopped(stage, step, t.steps, reason, ckpt_path)
        accelerator.wait_for_everyone()
        return {"stage": stage, "steps": t.steps, "preempted": True, "step": step, "checkpoint": str(ckpt_path)}
    stop.clear_marker()

    # ---- exports -------------------------------------------------------------------------------------
    result: dict[str, Any] = {"stage": stage, "steps": t.steps, "weights": str(paths.weights)}
    final_weights = dist_utils.full_state(raw_model, optimizer)[0] if use_ds else None  # fp32, a collective
    if ema is not None:
        final_weights = ema.state_dict()
    if is_main:
        meta = {"stage": stage, "steps": str(t.steps), "golf_dist": __version__,
                "weights": "ema" if ema is not None else "trained"}
        save_weights(final_weights or raw_model.state_dict(), paths.weights, meta)
        best = best_checkpoint(paths.checkpoints)
        if best is not None:  # the EMA weights when the run kept one: what validation scored
            save_weights(exported_weights(best), paths.best_weights, meta)
            tracker.log_artifact(paths.best_weights, "weights")
        tracker.log_artifact(paths.weights, "weights")
        info = {"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.display_uri,
                "weights_sha256": sha256_file(paths.weights)}
        write_atomic(paths.run_info, json.dumps(info, indent=2).encode())
        if last_val is not None:
            result["val_psnr"] = last_val[1]
        result.update(best_val_psnr=best_psnr if best_psnr > -math.inf else None, **info)
        tracker.end()  # also prints what could not be logged (counted by kind), if anything
        result["tracking_failures"] = dict(tracker.failed)
        print(f"stage {stage} done: weights {paths.weights}; MLflow run {tracker.run_id} at {tracker.display_uri}",
              flush=True)
    accelerator.wait_for_everyone()
    return result

