"""DeepSpeed ZeRO-2 against DDP on stage g, on CPU: a verification harness, not part of the library.

    torchrun --standalone --nproc_per_node 2 tests/deepspeed_vs_ddp.py --shards DIR [--f-weights F]

Trains G side by side with DDP and with the DeepSpeed engine on the same batches and prints one JSON
object: the relative weight and Adam-moment gaps, and whether ZeRO's partitioned state, gathered by
golf_dist.training.distributed.full_state and loaded into a fresh engine by load_full_state, resumes exactly.
Exit 0 when the gaps are within --tolerance. tests/test_distributed.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from golf_dist.commands.launch import DEEPSPEED_ZERO2_JSON, read_deepspeed_json  # noqa: E402
from golf_dist.errors import ConfigError  # noqa: E402
from golf_dist.training.distributed import full_state, load_full_state, process_group_timeout  # noqa: E402


def _relative_gap(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> tuple[float, float]:
    gap = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in ref))
    scale = math.sqrt(sum(float(((a[k] - ref[k]) ** 2).sum()) for k in ref))
    return gap / scale if scale > 0 else math.inf, scale


def check_deepspeed(
    shards: str | os.PathLike,
    steps: int = 3,
    global_batch: int = 4,
    accum: int = 2,
    unroll_steps: int = 2,
    crop: int = 32,
    seed: int = 1,
    lr: float = 1e-3,
    f_weights: str | None = None,
    ds_json: str | os.PathLike = DEEPSPEED_ZERO2_JSON,
) -> dict[str, Any]:
    """Stage g trained side by side by DDP and by the DeepSpeed ZeRO-2 engine on the same batches.

    Run under torchrun (any world size, CPU, gloo). The frozen F stays outside both; G is unrolled
    with checkpointing (golf_dist.models.unroll) and the loss is Eq. 4 (golf_dist.losses.unrolled_loss),
    as in the trainer. The DeepSpeed JSON is the project's ZeRO-2 file adapted for CPU (bf16 off,
    batch sizes filled in). Returns the relative weight gap ||w_ds - w_ddp|| / ||w_ddp - w_0||, the
    same for Adam's moments, and a resume check: the ZeRO state gathered by `full_state`, loaded into
    a fresh engine with `load_full_state`, gives the same next step.
    """
    import deepspeed
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from golf_dist.checkpoints import load_into
    from golf_dist.data.crop_plan import CropPlan
    from golf_dist.data.torch_loader import ShardPairs, train_loader
    from golf_dist.losses import GolfLoss
    from golf_dist.models import f_net, g_net
    from golf_dist.training.stages import GStage

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=process_group_timeout())
    world, rank = dist.get_world_size(), dist.get_rank()
    if global_batch % (world * accum):
        raise ConfigError(f"global batch {global_batch} does not divide across {world} process(es) x accum {accum}")
    pairs = ShardPairs(shards, "train")
    plan = CropPlan(len(pairs), crop, True, seed)
    torch.manual_seed(seed)
    f = f_net(zero_init_last=False)
    if f_weights:
        load_into(f, Path(f_weights), "F")
    f.requires_grad_(False).eval()
    loss_fn = GolfLoss(0.0, None)

    ds_config = read_deepspeed_json(ds_json)
    ds_config.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=global_batch // (world * accum),
        gradient_accumulation_steps=accum,
        bf16={"enabled": False},
        fp16={"enabled": False},
    )
    if ds_config.get("gradient_clipping") in ("auto", None):  # the trainer fills it from train.grad_clip
        ds_config["gradient_clipping"] = 0.0
    ds_config.setdefault("zero_optimization", {})["stage"] = 2
    ds_config["zero_optimization"]["overlap_comm"] = False  # no side streams on the CPU accelerator

    def make_g():
        torch.manual_seed(seed)
        return g_net()

    def make_engine(g):
        opt = torch.optim.Adam(g.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.3 ** (s / max(steps, 1)))
        engine, zero_opt, _, _ = deepspeed.initialize(model=g, optimizer=opt, config=ds_config)
        return engine, zero_opt, sched

    init = {k: v.clone() for k, v in make_g().state_dict().items()}
    g_ddp = make_g()
    ddp = DistributedDataParallel(g_ddp)
    opt_ddp = torch.optim.Adam(g_ddp.parameters(), lr=lr)
    sched_ddp = torch.optim.lr_scheduler.LambdaLR(opt_ddp, lambda s: 0.3 ** (s / max(steps, 1)))
    engine, zero_opt, sched_ds = make_engine(make_g())

    g_stage = GStage(loss_fn, f, unroll_steps, checkpointing=True)  # Eq. 4 as the trainer computes it

    def g_loss(net, blur, sharp):
        return g_stage.loss(net, blur, sharp)["total"]

    def ds_step(eng, micro_batches, sched):
        for blur, sharp in micro_batches:
            eng.backward(g_loss(eng, blur, sharp))  # the engine scales by 1/accum and steps at the boundary
            eng.step()
        sched.step()

    loader = iter(train_loader(pairs, plan, global_batch, accum, world, rank, 0, steps + 1, 0))
    for _ in range(steps):
        micro_batches = [tuple(next(loader))[:2] for _ in range(accum)]  # (blur, sharp[, skipped])
        for m, (blur, sharp) in enumerate(micro_batches):
            ctx = ddp.no_sync() if m < accum - 1 else contextlib.nullcontext()
            with ctx:
                (g_loss(ddp, blur, sharp) / accum).backward()
        opt_ddp.step()
        opt_ddp.zero_grad(set_to_none=True)
        sched_ddp.step()
        ds_step(engine, micro_batches, sched_ds)

    ds_weights, ds_adam = full_state(engine.module, zero_opt)
    ddp_weights = {k: v.detach().clone() for k, v in g_ddp.state_dict().items()}
    ddp_adam = opt_ddp.state_dict()
    weight_gap, moved = _relative_gap(ds_weights, ddp_weights, init)
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        n = len(ddp_adam["state"])
        num = math.sqrt(
            sum(float(((ds_adam["state"][i][key] - ddp_adam["state"][i][key]) ** 2).sum()) for i in range(n))
        )
        den = math.sqrt(sum(float((ddp_adam["state"][i][key] ** 2).sum()) for i in range(n)))
        moments[key] = num / den
    adam_steps = {float(ds_adam["state"][0]["step"]), float(ddp_adam["state"][0]["step"])}

    # resume: a fresh engine loaded from the gathered state takes the same next step as the old one
    engine2, zero_opt2, sched2 = make_engine(g_net())
    load_full_state(engine2.module, zero_opt2, ds_weights, ds_adam)
    for _ in range(steps):
        sched2.step()
    micro_batches = [tuple(next(loader))[:2] for _ in range(accum)]
    ds_step(engine, micro_batches, sched_ds)
    ds_step(engine2, micro_batches, sched2)
    cont, _ = full_state(engine.module, zero_opt)
    resumed, _ = full_state(engine2.module, zero_opt2)
    resume_gap = math.sqrt(sum(float(((cont[k] - resumed[k]) ** 2).sum()) for k in cont))
    return {
        "world_size": world,
        "steps": steps,
        "global_batch": global_batch,
        "grad_accum": accum,
        "unroll": unroll_steps,
        "zero_stage": ds_config["zero_optimization"]["stage"],
        "optimizer": type(zero_opt).__name__,
        "weight_gap": weight_gap,
        "weights_moved": moved,
        "exp_avg_gap": moments["exp_avg"],
        "exp_avg_sq_gap": moments["exp_avg_sq"],
        "adam_steps": sorted(adam_steps),
        "resume_gap": resume_gap,
    }


def main(argv: list[str] | None = None) -> int:
    ds = argparse.ArgumentParser(
        prog="torchrun ... tests/deepspeed_vs_ddp.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ds.add_argument("--shards", required=True, help="shard directory (data_prep/shard_gopro.py)")
    ds.add_argument("--steps", type=int, default=3, help="optimizer steps (default: %(default)s)")
    ds.add_argument("--batch-size", type=int, default=4, help="global batch (default: %(default)s)")
    ds.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default: %(default)s)")
    ds.add_argument("--unroll", type=int, default=2, help="unrolled G steps (default: %(default)s)")
    ds.add_argument("--crop", type=int, default=32, help="crop size (default: %(default)s)")
    ds.add_argument("--f-weights", help="a trained F (default: a seeded random F)")
    ds.add_argument("--deepspeed-config", default=str(DEEPSPEED_ZERO2_JSON), help="default: %(default)s")
    ds.add_argument("--tolerance", type=float, default=2e-2, help="largest relative weight gap (default: %(default)s)")
    args = ds.parse_args(argv)
    result = check_deepspeed(
        args.shards,
        steps=args.steps,
        global_batch=args.batch_size,
        accum=args.grad_accum,
        unroll_steps=args.unroll,
        crop=args.crop,
        f_weights=args.f_weights,
        ds_json=args.deepspeed_config,
    )
    import torch.distributed as dist

    ok = result["weight_gap"] < args.tolerance and result["resume_gap"] < 1e-5
    if dist.get_rank() == 0:
        print(json.dumps({**result, "ok": ok}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from golf_dist.commands.common import run_main

    run_main(main)
