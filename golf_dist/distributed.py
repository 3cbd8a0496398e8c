"""What training across processes needs beyond Accelerate's defaults: launch-config checks, the
mixed precision a launcher asks for, process-group timeouts and DeepSpeed ZeRO-2 specifics.

    python -m golf_dist.distributed check-config configs/accelerate/one_node.yaml
    python -m golf_dist.distributed torchrun -- --nnodes 2 ... launch/train.py ...   # clear rendezvous errors
    torchrun --standalone --nproc_per_node 2 -m golf_dist.distributed \\
        check-deepspeed --shards DIR      # DeepSpeed ZeRO-2 (CPU accelerator, gloo) against DDP, stage g

DeepSpeed and checkpoints: under ZeRO-2 each rank holds only its slice of Adam's state, and with
bf16 the model's parameters are bf16 copies of fp32 master weights held by the optimizer.
`full_state` gathers the fp32 weights and the whole Adam state from every rank into the layout
`torch.optim.Adam.state_dict()` has, so a checkpoint is the same file whether DDP or DeepSpeed wrote
it, and `load_full_state` puts such a checkpoint back into a DeepSpeed engine (resume works across
DDP <-> DeepSpeed and across world sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from golf_dist.errors import ConfigError

ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
DEEPSPEED_ZERO2_JSON = ACCELERATE_CONFIGS / "deepspeed_zero2.json"
TIMEOUT_ENV = "GOLF_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


# ---- launch configs ------------------------------------------------------------------------------


def check_accelerate_config(path: str | os.PathLike) -> dict[str, Any]:
    """Load an `accelerate launch --config_file` file with Accelerate's own loader; a missing,
    unreadable or invalid file (or a DeepSpeed JSON it names) is a ConfigError naming the file.

    Returns a short summary (distributed type, processes, machines, mixed precision, rendezvous).
    `accelerate launch` itself stops on a missing file with a clear last line; this check gives the
    same verdict before a job is queued (the SLURM script runs it) and covers the DeepSpeed JSON,
    which Accelerate only opens inside every worker.
    """
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"accelerate config {path} does not exist (configs/accelerate/ has the project's)")
    if not path.is_file():
        raise ConfigError(f"accelerate config {path} is not a file")
    try:
        config = load_config_from_file(str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"accelerate config {path} is unreadable: {err}") from None
    except Exception as err:  # yaml errors, unknown keys (ValueError), bad enum values
        detail = " ".join(str(err).split())
        raise ConfigError(f"accelerate config {path} is not a valid Accelerate config: {detail}") from None
    summary = {
        "distributed_type": str(getattr(config.distributed_type, "value", config.distributed_type)),
        "num_processes": getattr(config, "num_processes", 1),
        "num_machines": getattr(config, "num_machines", 1),
        "mixed_precision": config.mixed_precision,
        "rdzv_backend": getattr(config, "rdzv_backend", None),
    }
    ds = getattr(config, "deepspeed_config", None) or {}
    ds_file = ds.get("deepspeed_config_file")
    if summary["distributed_type"] == "DEEPSPEED":
        if not ds_file:
            raise ConfigError(f"accelerate config {path}: deepspeed_config.deepspeed_config_file is not set")
        read_deepspeed_json(ds_file, named_in=path)
        summary["deepspeed_config_file"] = ds_file
    return summary


def read_deepspeed_json(path: str | os.PathLike, named_in: str | os.PathLike | None = None) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict; missing or malformed is a ConfigError naming it."""
    where = f" (named in {named_in}; a relative path is read from the directory you launch in)" if named_in else ""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist{where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"DeepSpeed config {path} is unreadable{where}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON{where}: {err}") from None


# ---- torchrun with a clear rendezvous error ------------------------------------------------------


def _torchrun_option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def rendezvous_failure_message(args: list[str], stderr_tail: str) -> str | None:
    """A one-paragraph explanation when torchrun's agent gave up on the rendezvous, else None.

    torchrun ends with a bare `RendezvousTimeoutError` traceback (or a connection error to the
    endpoint); this says which rendezvous, how long it waited and what to check.
    """
    timed_out = "RendezvousTimeoutError" in stderr_tail
    unreachable = "RendezvousConnectionError" in stderr_tail or "DistNetworkError" in stderr_tail
    if not (timed_out or unreachable):
        return None
    endpoint = _torchrun_option(args, "--rdzv-endpoint", "--rdzv_endpoint") or "(no --rdzv-endpoint)"
    nnodes = _torchrun_option(args, "--nnodes") or "1"
    conf = _torchrun_option(args, "--rdzv-conf", "--rdzv_conf") or ""
    join = next((kv.split("=", 1)[1] for kv in conf.split(",") if kv.startswith("join_timeout=")), "600 (default)")
    if timed_out:
        return (
            f"the rendezvous at {endpoint} did not form: --nnodes {nnodes} launchers were expected, not all of "
            f"them joined within join_timeout={join} s (RendezvousTimeoutError). Check that a launcher was "
            f"started on every node (SLURM: one task per node), that {endpoint} is reachable from each node, and "
            "that all use the same --rdzv-endpoint and --rdzv-id"
        )
    return (
        f"the rendezvous endpoint {endpoint} could not be reached (--nnodes {nnodes}): check the head node's "
        "address and port and that the launcher on the head node (node rank 0) is running"
    )


def run_torchrun(args: list[str]) -> int:
    """`python -m torch.distributed.run ARGS`, output passed through; a failed rendezvous ends with a
    clear `error:` line (exit 1). SIGTERM, SIGINT and SIGUSR2 are forwarded to torchrun."""
    import collections
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stderr=subprocess.PIPE, text=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, lambda num, _frame: proc.send_signal(num))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    code = proc.wait()
    if code != 0:
        message = rendezvous_failure_message(args, "".join(tail))
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
            return 1
    return code


# ---- Accelerator construction --------------------------------------------------------------------


def resolve_mixed_precision(configured: str, launcher: str | None = None) -> str:
    """The mixed precision to run with: the golf config's train.mixed_precision, or the launcher's.

    `accelerate launch --config_file configs/accelerate/one_node.yaml` asks for bf16 through
    ACCELERATE_MIXED_PRECISION; an explicit Accelerator(mixed_precision=...) would silently override
    it. Rule: whichever of the two is not "no" wins; both set and different is a ConfigError.
    """
    launcher = (launcher if launcher is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    configured = configured.lower()
    if launcher in ("", "no"):
        return configured
    if configured == "no" or configured == launcher:
        return launcher
    raise ConfigError(
        f"config key 'train.mixed_precision'={configured} disagrees with the launcher's mixed precision "
        f"{launcher} (accelerate launch --mixed_precision or the config file's mixed_precision); set one of them"
    )


def process_group_timeout() -> timedelta:
    """How long a collective may wait for the other ranks before the run fails (GOLF_DIST_TIMEOUT_S).

    A rank that hangs (not one that dies: torchrun ends the others then) would otherwise block the
    rest for PyTorch's default (10 min NCCL, 30 min gloo). Long enough for a checkpoint or a
    validation on the main process while the others wait at the barrier.
    """
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"environment variable {TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, per_device: int, accum: int, global_batch: int,
                        grad_clip: float = 0.0) -> dict[str, Any]:
    """Fill the DeepSpeed config's batch sizes (and gradient clipping) from the golf config, before `prepare()`.

    Accelerate takes `train_micro_batch_size_per_gpu` from a prepared DataLoader; our loader is not
    prepared (its sharding is ours), so it is set here. A JSON with explicit batch values that
    disagree with data.batch_size / train.grad_accum is a ConfigError.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": per_device,
        "gradient_accumulation_steps": accum,
        "train_batch_size": global_batch,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current != "auto" and int(current) != value:
            raise ConfigError(
                f"DeepSpeed config sets {key}={current}, but data.batch_size={global_batch} and "
                f"train.grad_accum={accum} give {value}; set it to \"auto\" in the JSON"
            )
        ds[key] = value
    # the engine clips inside its step: train.grad_clip goes into its config (0 = off, as in DeepSpeed)
    current = ds.get("gradient_clipping", "auto")
    if current not in ("auto", None) and float(current) != grad_clip:
        raise ConfigError(
            f"DeepSpeed config sets gradient_clipping={current}, but train.grad_clip={grad_clip}; "
            "set it to \"auto\" in the JSON"
        )
    ds["gradient_clipping"] = grad_clip
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    if zero not in (0, 1, 2):
        raise ConfigError(
            f"DeepSpeed ZeRO stage {zero}: this trainer supports stages 0-2 (stage 3 partitions the weights, "
            "which full_state does not gather)"
        )
    return ds


def deepspeed_autocast(ds_config: dict[str, Any], device: torch.device) -> Callable[[], Any] | None:
    """With DeepSpeed bf16 the trained network's weights are bf16 while the data, the frozen F and
    the loss are fp32: run forward passes under bf16 autocast (Accelerate's autocast is off under
    DeepSpeed). None when DeepSpeed runs in fp32."""
    if str(ds_config.get("bf16", {}).get("enabled", False)).lower() == "true":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if str(ds_config.get("fp16", {}).get("enabled", False)).lower() == "true":
        raise ConfigError("DeepSpeed fp16 is not supported here (InstanceNorm overflows); use bf16 in the JSON")
    return None


# ---- DeepSpeed: checkpoints in the plain Adam layout ---------------------------------------------


def _zero_optimizer(optimizer):
    """The DeepSpeedZeroOptimizer behind Accelerate's wrapper (or the one deepspeed.initialize returned)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "single_partition_of_fp32_groups") else optimizer


def full_state(module: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights and Adam's state of a DeepSpeed ZeRO-1/2 model, whole, in torch.optim.Adam's layout.

    A collective: every rank must call it (each contributes its partition). Returns CPU tensors.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    base = zero.optimizer  # the torch.optim.Adam whose params are the flat fp32 partitions
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    weights = {}
    for name, p in zip(names, params):
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"parameter {name} is not managed by a DeepSpeed ZeRO-1/2 optimizer")
        weights[name] = full.detach().float().cpu().clone()
    for name, buf in module.named_buffers():
        weights[name] = buf.detach().cpu().clone()
    state: dict[int, dict[str, torch.Tensor]] = {}
    steps = [s["step"] for s in base.state.values() if "step" in s]
    if steps:
        step = torch.as_tensor(steps[0], dtype=torch.float32).detach().cpu().clone()
        for i, p in enumerate(params):
            entry = {"step": step.clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
            state[i] = entry
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    return weights, {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def load_full_state(module: torch.nn.Module, optimizer, weights: dict[str, torch.Tensor], adam: dict[str, Any]) -> None:
    """Put a checkpoint in Adam's layout (`full_state`'s, or one DDP wrote) into a DeepSpeed ZeRO-1/2
    model: the fp32 master weights, their bf16/fp32 working copies, Adam's moments and step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    base = zero.optimizer
    named = dict(module.named_parameters())
    missing = sorted(set(named) - set(weights))
    if missing:
        raise ConfigError(f"checkpoint has no weights for {missing[:3]}...: it belongs to another network")
    with torch.no_grad():
        for name, p in named.items():
            value = weights[name].to(p.device)
            safe_set_full_fp32_param(p, value.float())
            p.data.copy_(value.to(p.dtype))
        for name, buf in module.named_buffers():
            if name in weights:
                buf.copy_(weights[name])
    params = list(named.values())
    state = adam.get("state", {})
    if state:
        first = state[0] if 0 in state else state[str(0)]
        step = first["step"]
        if not base.state:
            # a fresh engine: Adam creates its state at the first step, and ZeRO links each parameter
            # to its fragment of that state only then; create both now, then overwrite the values
            for flat in zero.single_partition_of_fp32_groups:
                base.state[flat] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for i, p in enumerate(params):
            entry = state[i] if i in state else state[str(i)]
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, entry[key].to(p.device).float(), key)
        for s in base.state.values():
            if "step" in s:
                s["step"] = torch.as_tensor(step, dtype=torch.float32).clone() if torch.is_tensor(s["step"]) else float(step)
    for key in ("lr", "initial_lr"):
        for group in adam.get("param_groups", []):
            if key in group:
                for g in base.param_groups:
                    g[key] = group[key]


# ---- DeepSpeed against DDP, on CPU ---------------------------------------------------------------


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
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
    from golf_dist.data.loader import CropPlan, ShardPairs, train_loader
    from golf_dist.losses import GolfLoss, unrolled_loss
    from golf_dist.models import f_net, g_net, unroll

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
        train_batch_size=global_batch, train_micro_batch_size_per_gpu=global_batch // (world * accum),
        gradient_accumulation_steps=accum, bf16={"enabled": False}, fp16={"enabled": False},
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

    def g_loss(net, blur, sharp):
        with torch.no_grad():
            x0 = f(blur)
        return unrolled_loss(loss_fn, unroll(net, x0, unroll_steps, checkpoint=True), sharp, checkpoint=True)["total"]

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
        num = math.sqrt(sum(float(((ds_adam["state"][i][key] - ddp_adam["state"][i][key]) ** 2).sum()) for i in range(n)))
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
    parser = argparse.ArgumentParser(
        prog="python -m golf_dist.distributed", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="check an accelerate config file (and its DeepSpeed JSON)")
    check.add_argument("config", help="e.g. configs/accelerate/multi_node.yaml")
    ds = sub.add_parser(
        "check-deepspeed", help="DeepSpeed ZeRO-2 against DDP on stage g (run under torchrun, CPU, gloo)",
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
    run = sub.add_parser(
        "torchrun", help="torchrun with a clear error when the rendezvous cannot form (args after --)",
        description="python -m golf_dist.distributed torchrun -- --nnodes 2 --node_rank 0 --nproc_per_node 8 "
        "--rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-conf join_timeout=300 launch/train.py --stage f",
    )
    run.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="arguments for torch.distributed.run")
    args = parser.parse_args(argv)
    if args.command == "torchrun":
        rest = args.torchrun_args[1:] if args.torchrun_args[:1] == ["--"] else args.torchrun_args
        return run_torchrun(rest)
    if args.command == "check-config":
        print(json.dumps(check_accelerate_config(args.config)))
        return 0
    result = check_deepspeed(
        args.shards, steps=args.steps, global_batch=args.batch_size, accum=args.grad_accum,
        unroll_steps=args.unroll, crop=args.crop, f_weights=args.f_weights, ds_json=args.deepspeed_config,
    )
    import torch.distributed as dist

    ok = result["weight_gap"] < args.tolerance and result["resume_gap"] < 1e-5
    if dist.get_rank() == 0:
        print(json.dumps({**result, "ok": ok}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from golf_dist.cli import run_main

    run_main(main)
