"""Figures a person looks at: PSNR against G iteration, training curves, blur | F | F + N G | sharp, and the
held-out evaluation's gain map and before | after picture.

matplotlib with the Agg backend (no display needed); every function writes one PNG atomically and returns
its path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from golf_dist.files import atomic_path
from golf_dist.log import get_logger

log = get_logger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, tmp=path.with_name(f".{path.name}.tmp-{os.getpid()}.png")) as tmp:  # .png: the format
        fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata=metadata)
    return path


def psnr_by_iteration(values: Sequence[float], input_psnr: float, path: Path, title: str = "") -> Path:
    """PSNR after F (iteration 0) and after each G iteration 1..N, with the blurred input as a line. The points
    drawn are also stored in the PNG's text chunk `golf:series` (JSON), so a reader can check what it shows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    xs = list(range(len(values)))
    ax.plot(xs, values, marker="o", color="tab:blue", label="F, then G iterations")
    ax.axhline(input_psnr, color="tab:gray", linestyle="--", label=f"blurred input ({input_psnr:.2f} dB)")
    for x, v in zip(xs, values):
        ax.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(["F"] + [str(i) for i in xs[1:]])
    ax.set_xlabel("G iteration")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title or "PSNR against G iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    series = json.dumps({"iterations": xs, "psnr": list(values), "input_psnr": input_psnr})
    try:
        return _save(fig, path, {"golf:series": series})
    finally:
        plt.close(fig)


def read_metrics(jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    """A stage's metrics.jsonl as {name: [(step, value), ...]}; a step logged twice (after a resume): the last wins."""
    by_name: dict[str, dict[int, float]] = {}
    for number, line in enumerate(Path(jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a full disk or a killed writer: skip it, say which
            log.warning(f"warning: {jsonl} line {number} is not a JSON record (cut short?); skipped")
            continue
        if not isinstance(row, dict):
            log.warning(f"warning: {jsonl} line {number} is not a JSON object; skipped")
            continue
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                by_name.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in by_name.items()}


def training_curves(runs: dict[str, Path], path: Path) -> Path:
    """Validation PSNR gain over the input against step for each labelled stage folder (DIR/f, DIR/g ...), with
    the per-G-iteration series of stage g runs, the training loss and the gradient norm. A stage g folder
    is drawn after the stage f folder of the same output folder (its steps shifted by F's last step), so
    the x axis reads as the pipeline's steps."""
    plt = _pyplot()
    fig, (ax_val, ax_loss, ax_norm) = plt.subplots(1, 3, figsize=(15, 3.8))
    last_f_step: dict[Path, int] = {}
    for label, stage_dir in runs.items():
        raw = read_metrics(Path(stage_dir) / "metrics.jsonl")
        stage_dir = Path(stage_dir)
        steps_seen = [s for series in raw.values() for s, _ in series]
        if stage_dir.name == "f" and steps_seen:
            last_f_step[stage_dir.parent] = max(steps_seen)
        shift = last_f_step.get(stage_dir.parent, 0) if stage_dir.name == "g" else 0
        m = {k: [(s + shift, v) for s, v in series] for k, series in raw.items()}
        base = dict(m.get("val_input_psnr", []))
        iters = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("val_psnr_iter_"))
        if len(iters) > 1:
            for i in iters:
                pts = m[f"val_psnr_iter_{i}"]
                ax_val.plot(
                    [s for s, _ in pts],
                    [v - base.get(s, 0.0) for s, v in pts],
                    marker=".",
                    label=f"{label}: {'F' if i == 0 else f'F + {i} G'}",
                    alpha=0.5 if i == 0 else 1.0,
                )
        elif "val_psnr" in m:
            pts = m["val_psnr"]
            ax_val.plot([s for s, _ in pts], [v - base.get(s, 0.0) for s, v in pts], marker="o", label=label)
        if "loss" in m:
            ax_loss.plot(*zip(*m["loss"]), label=label)
        if "grad_norm" in m:
            ax_norm.plot(*zip(*m["grad_norm"]), label=label)
    ax_val.axhline(0, color="tab:gray", linestyle="--", linewidth=0.8)
    ax_val.set(xlabel="step (G's after F's)", ylabel="validation PSNR gain over the input (dB)", title="validation")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss (window mean)", yscale="log")
    ax_norm.set(xlabel="step", ylabel="global gradient norm", title="gradient norm (window mean)", yscale="log")
    for ax in (ax_val, ax_loss, ax_norm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _region(blur: np.ndarray, final: np.ndarray, sharp: np.ndarray, size: int) -> tuple[int, int]:
    """(top, left) of the size x size window where the output's squared error falls most below the input's."""
    gain = ((blur - sharp) ** 2 - (final - sharp) ** 2).mean(axis=2)
    h, w = gain.shape
    if h <= size or w <= size:
        return 0, 0
    integral = np.pad(gain.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def comparison(frames: Sequence[dict], path: Path, region: int = 96, iterations: int | str = 3) -> Path:
    """One row per frame: blur | F | F + N G (N: a count or "auto") | sharp, on the region where the output gains
    most, each panel titled with the region's PSNR. `frames`: dicts with key, blur, f, final, sharp (HxWx3 float
    in [0, 1])."""
    plt = _pyplot()
    cols = ["blurred input", "F", f"F + {iterations} G", "sharp"]
    fig, axes = plt.subplots(len(frames), 4, figsize=(12, 3.2 * len(frames)), squeeze=False)
    for row, frame in zip(axes, frames):
        size = min(region, *frame["sharp"].shape[:2])
        top, left = _region(frame["blur"], frame["final"], frame["sharp"], size)
        crop = {k: frame[k][top : top + size, left : left + size] for k in ("blur", "f", "final", "sharp")}
        for ax, name, key in zip(row, cols, ("blur", "f", "final", "sharp")):
            ax.imshow(np.clip(crop[key], 0, 1), interpolation="nearest")
            title = name if key == "sharp" else f"{name}: {_psnr(crop[key], crop['sharp']):.2f} dB"
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{frame['key']}\n({top},{left}) {size}x{size}", fontsize=8)
    fig.suptitle("PSNR of the region shown against the sharp frame", fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def gain_map(cases: Sequence[dict], path: Path, title: str = "") -> Path:
    """A heat map of PSNR gain (dB): one row per photograph, one column per kernel and noise level, each cell
    annotated, red for a loss, blue for a gain. `cases`: dicts with photograph, kernel, noise, gain. What is drawn
    is also stored in the PNG's text chunk `golf:series` (JSON: rows, columns, gain)."""
    plt = _pyplot()
    rows = list(dict.fromkeys(c["photograph"] for c in cases))
    columns = list(dict.fromkeys((c["kernel"], c["noise"]) for c in cases))
    gain = np.full((len(rows), len(columns)), np.nan)
    for c in cases:
        gain[rows.index(c["photograph"]), columns.index((c["kernel"], c["noise"]))] = c["gain"]
    limit = max(0.1, float(np.nanmax(np.abs(gain))))
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.5, 0.45 * len(rows) + 1.8))
    shown = ax.imshow(gain, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(gain):
        ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"{k}\nnoise {n:g}" for k, n in columns], fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    fig.colorbar(shown, ax=ax, label="PSNR gain over the blurred input (dB)")
    ax.set_title(title or "PSNR gain per photograph and kernel", fontsize=9)
    series = json.dumps({"rows": rows, "columns": [list(c) for c in columns], "gain": gain.tolist()})
    try:
        return _save(fig, path, {"golf:series": series})
    finally:
        plt.close(fig)


def before_after(before: np.ndarray, after: np.ndarray, path: Path, title: str = "") -> Path:
    """Two HxWx3 uint8 pictures side by side: the input and the restoration (no reference, no metric)."""
    plt = _pyplot()
    height, width = before.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(2 * 4.5, 4.5 * height / width + 0.6))
    for ax, image, label in zip(axes, (before, after), ("input", "restored")):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def two_pixel(surfaces: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """The paper's figures 10 to 14 as one PNG: the discriminative prior p (10), its blur logit (12), the
    prior integrated from the learned gradient (13), the optimal prior (14), and their slices along
    u1 = u2 (11)."""
    plt = _pyplot()
    grid = surfaces["grid"]
    u1, u2 = np.meshgrid(grid, grid, indexing="xy")
    fig = plt.figure(figsize=(15, 8.4))
    panels = (
        ("p", "Fig. 10: discriminative prior p(u)"),
        ("logit", "Fig. 12: its logit (no softmax)"),
        ("learned", "Fig. 13: prior integrated from learned -grad p"),
        ("optimal", "Fig. 14: optimal p* = (u1+u2)^2/2"),
    )
    for index, (key, label) in enumerate(panels):
        ax = fig.add_subplot(2, 3, index + 1 + (index >= 2), projection="3d")
        ax.plot_surface(u1, u2, surfaces[key], cmap="coolwarm", linewidth=0, antialiased=True)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("u1")
        ax.set_ylabel("u2")
    ax = fig.add_subplot(2, 3, 3)
    diagonal = np.arange(len(grid))  # u = (t, t)
    for key, label in (("p", "discriminative p"), ("learned", "learned (Golf)"), ("optimal", "optimal p*")):
        ax.plot(grid, surfaces[key][diagonal, diagonal], label=label)
    ax.set_title("Fig. 11: slices along u1 = u2 = t", fontsize=9)
    ax.set_xlabel("t")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title or "The two-pixel prior", fontsize=11)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def forgetting(curves: dict[str, dict[str, list]], phase_steps: int, path: Path) -> Path:
    """The paper's Figure 5 (a) to (d): per schedule, task 1's PSNR (F on sharp input, left axis) and task
    2's gain over the blurred input (right axis) against the step, the phase change marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        ax.plot(curve["step"], curve["task1_psnr"], color="tab:blue", marker=".", label="task 1: PSNR of F(sharp)")
        ax.set_ylabel("task 1 PSNR (dB)", color="tab:blue")
        twin = ax.twinx()
        twin.plot(curve["step"], curve["task2_gain"], color="tab:red", marker=".", label="task 2: gain of F(blur)")
        twin.set_ylabel("task 2 gain over input (dB)", color="tab:red")
        ax.axvline(phase_steps, color="tab:gray", linestyle="--", linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Catastrophic forgetting (Fig. 5): one F, two tasks; dashed: the phase change", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path, {"golf:series": json.dumps(curves)})
    finally:
        plt.close(fig)


def lambda_sweep(frames: Sequence[dict], path: Path, region: int = 96) -> Path:
    """The paper's Figure 8: one test region, blurred input | the output of each run | sharp, each titled with
    its label and PSNR. `frames`: dicts with blur, f (the run's output), sharp and label, of the same frame."""
    plt = _pyplot()
    first = frames[0]
    size = min(region, *first["sharp"].shape[:2])
    top, left = _region(first["blur"], first["f"], first["sharp"], size)
    window = (slice(top, top + size), slice(left, left + size))
    panels = [("blurred input", first["blur"][window])] + [(f["label"], f["f"][window]) for f in frames]
    panels.append(("sharp", first["sharp"][window]))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    sharp = first["sharp"][window]
    for ax, (label, image) in zip(axes[0], panels):
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        ax.set_title(label if label == "sharp" else f"{label}: {_psnr(image, sharp):.2f} dB", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{first['key']}: the output of F for each perceptual weight (Fig. 8)", fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
