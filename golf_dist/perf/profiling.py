"""Where the time of one step goes: torch.profiler over a few repeats of a step, reduced to the top
operators (on a GPU, the top kernels) by self time, as a table and as JSON rows.

`launch/benchmark.py --profile DIR` uses it for a stage-f step, a stage-g step and F + 3 G inference,
with the speed layer's switches and without; docs/benchmark.md says how to read the tables.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from golf_dist.files import write_atomic


def _self_us(event, on_gpu: bool) -> float:
    # torch renamed cuda_* to device_* (2.4); read whichever this build has
    if on_gpu:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


def top_operators(
    fn: Callable[[], None], device: str, *, warmup: int = 1, repeats: int = 3, top: int = 15
) -> tuple[list[dict], str]:
    """Profile `repeats` calls of fn (after `warmup` unprofiled ones) on `device` ("cpu" or "cuda").

    Returns the `top` operators by self time, each {"name", "calls", "self_ms" (per call of fn),
    "share" (of the profiled self time)}, and the profiler's own table of the same rows. On a GPU the
    time is the kernels' time on the device; on a CPU, the operators' time on the host.
    """
    for _ in range(warmup):
        fn()
    on_gpu = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    averages = prof.key_averages()  # slow on a CPU (seconds per call): computed once for the rows and the table
    events = [e for e in averages if _self_us(e, on_gpu) > 0]
    total = sum(_self_us(e, on_gpu) for e in events) or 1.0
    events.sort(key=lambda e: _self_us(e, on_gpu), reverse=True)
    rows = [
        {
            "name": e.key,
            "calls": int(e.count) // repeats,
            "self_ms": round(_self_us(e, on_gpu) / 1e3 / repeats, 4),
            "share": round(_self_us(e, on_gpu) / total, 4),
        }
        for e in events[:top]
    ]
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=top)
    return rows, table


def write_profile(folder: Path, name: str, rows: list[dict], table: str, title: str) -> Path:
    """`folder`/profile_<name>.txt: a title line, the top rows as a short table, then torch's table."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [title, "", f"{'self ms/step':>12}  {'share':>6}  {'calls':>5}  operator"]
    lines += [f"{r['self_ms']:12.3f}  {r['share']:6.1%}  {r['calls']:5d}  {r['name']}" for r in rows]
    path = folder / f"profile_{name}.txt"
    write_atomic(path, ("\n".join(lines) + "\n\ntorch.profiler (all repeats):\n" + table + "\n").encode())
    return path
