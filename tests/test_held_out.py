"""golf-evaluate --held-out (golf_dist/evaluation/held_out.py): its numbers against a computation of their own
here, on a tiny trained F + G, its files and MLflow run, and its refusals of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import mlflow_template, run_cli
from PIL import Image
from random_model import write_random_model
from scipy import ndimage

from golf_dist.checkpoints import load_into
from golf_dist.data.prep.held_out import held_out_photographs
from golf_dist.data.prep.kernels import HELD_OUT_SHAPES, held_out_kernel
from golf_dist.evaluation.held_out import HeldOutOptions, blurred_crop, kernels_of, summarise
from golf_dist.models import f_net, g_net, golf_iterates

SEED, CROP, KERNELS, NOISE, ITERATIONS = 4, 64, ("zigzag", "ring_defocus"), (0.0, 5.0), 2
TOLERANCE = 5e-3  # dB: the blur here is float64 and direct, the command's float32 and by FFT; a rare 8-bit rounding
# then differs by one level, which moves a 32x32 interior's input PSNR by less than this (0.0013 dB seen)


def _own_case(
    image: np.ndarray, photo_index: int, shape: str, sigma: float, f, g, scale: float = 1.0
) -> tuple[float, float]:
    """PSNR of the blurred input and of F + G's output against the sharp crop, computed here as the module doc of
    golf_dist/evaluation/held_out.py describes the case, with other means: scipy.ndimage and numpy. The output is
    F + G's on the module's own blurred crop, once that is checked against the one made here: one 8-bit level on a
    few pixels (float32 FFT against float64 direct sums) moves a 32x32 interior's output PSNR by up to 0.01 dB.
    With `scale`, the output is that blurred crop plus `scale` times F + G's correction of it."""
    height, width = image.shape[:2]
    crop_h, crop_w = min(CROP, height), min(CROP, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    kernel = held_out_kernel(shape, np.random.default_rng([SEED, HELD_OUT_SHAPES.index(shape)]), 17)
    blurred = np.stack(
        [ndimage.convolve(image[:, :, c].astype(np.float64), kernel, mode="mirror") for c in range(3)], axis=2
    )[top : top + crop_h, left : left + crop_w]
    seeds = [SEED, photo_index, HELD_OUT_SHAPES.index(shape), round(1000 * sigma)]
    noisy = blurred + np.random.default_rng(seeds).standard_normal(blurred.shape, dtype=np.float32) * np.float32(sigma)
    own_blur = np.rint(np.clip(noisy, 0, 255))
    module_blur = blurred_crop(image, (top, left, crop_h, crop_w), kernel, sigma, np.random.default_rng(seeds))
    assert np.abs(module_blur - own_blur).max() <= 1 and (module_blur != own_blur).mean() < 0.01
    sharp = image[top : top + crop_h, left : left + crop_w] / 255
    with torch.no_grad():
        x = torch.from_numpy(module_blur / 255).permute(2, 0, 1)[None].float()
        restored = x + scale * (golf_iterates(f, g, x, ITERATIONS)[-1] - x)
        out = restored[0].permute(1, 2, 0).clamp(0, 1).double().numpy()

    def interior_psnr(a: np.ndarray) -> float:
        return float(10 * np.log10(1 / ((a - sharp)[16:-16, 16:-16] ** 2).mean()))

    return interior_psnr(own_blur / 255), interior_psnr(out)


@pytest.fixture(scope="module")
def held_out_run(small_run, tmp_path_factory):
    """`launch/evaluate.py --held-out` on a copy of small_run's F + G (tests only read small_run's folder), two
    kernel shapes, noise 0 and 5, 64-pixel crops, into a store of its own."""
    base = tmp_path_factory.mktemp("held-out")
    out = base / "run"
    (out / "g").mkdir(parents=True)
    for name in ("f.safetensors", "g.safetensors", "g/config.yaml"):
        shutil.copy(small_run["out"] / name, out / name)
    db = base / "mlflow.db"
    shutil.copyfile(mlflow_template(), db)
    flags = ["--held-out-crop", CROP, "--held-out-kernels", ",".join(KERNELS), "--held-out-noise", "0,5"]
    proc = run_cli(
        "launch/evaluate.py",
        "--output-dir",
        out,
        "--held-out",
        "--iterations",
        ITERATIONS,
        *flags,
        "--held-out-seed",
        SEED,
        f"tracking.uri=sqlite:///{db}",
        check=True,
    )
    return {"out": out, "db": db, "stdout": proc.stdout, "result": json.loads(proc.stdout.strip().splitlines()[-1])}


def test_each_case_and_the_summary_match_a_computation_of_their_own(held_out_run):
    result, out = held_out_run["result"], held_out_run["out"]
    f = load_into(f_net(), out / "f.safetensors", "F").eval()
    g = load_into(g_net(), out / "g.safetensors", "G").eval()
    photos = held_out_photographs()
    assert len(photos) == 7 and len(result["cases"]) == 7 * len(KERNELS) * len(NOISE)
    own = []
    for index, photo in enumerate(photos):
        image = np.asarray(Image.open(photo.path).convert("RGB"))
        for shape in KERNELS:
            for sigma in NOISE:
                input_psnr, output_psnr = _own_case(image, index, shape, sigma, f, g)
                own.append((photo.name, shape, sigma, input_psnr, output_psnr))
    for case, (name, shape, sigma, input_psnr, output_psnr) in zip(result["cases"], own):
        assert (case["photograph"], case["kernel"], case["noise"]) == (name, shape, sigma)
        assert case["input_psnr"] == pytest.approx(input_psnr, abs=TOLERANCE), case
        assert case["psnr"] == pytest.approx(output_psnr, abs=TOLERANCE), case
        assert case["gain"] == pytest.approx(output_psnr - input_psnr, abs=TOLERANCE), case
        assert len(case["psnr_per_iteration"]) == ITERATIONS + 1 and case["psnr_per_iteration"][-1] == case["psnr"]
    gains = np.array([o - i for *_, i, o in own])
    clean = np.array([s == 0 for _, _, s, _, _ in own])
    summary = result["summary"]
    assert summary["cases"] == len(own)
    assert summary["mean_gain"] == pytest.approx(gains.mean(), abs=TOLERANCE)
    assert summary["clean_mean_gain"] == pytest.approx(gains[clean].mean(), abs=TOLERANCE)
    assert summary["noisy_mean_gain"] == pytest.approx(gains[~clean].mean(), abs=TOLERANCE)
    # a gain within the tolerance of 0 may count either way
    assert (gains > TOLERANCE).sum() <= summary["improved"] <= (gains > -TOLERANCE).sum()
    assert summary["worst"]["gain"] == pytest.approx(gains.min(), abs=TOLERANCE)
    # the case it names has (here too) the smallest gain, up to the tolerance
    worst = summary["worst"]
    named = [o - i for n, k, s, i, o in own if (n, k, s) == (worst["photograph"], worst["kernel"], worst["noise"])]
    assert named == [pytest.approx(gains.min(), abs=TOLERANCE)], worst
    assert result["kernels"] == {
        k: v.tolist() for k, v in kernels_of(HeldOutOptions(kernels=KERNELS, seed=SEED)).items()
    }


def test_what_it_prints_writes_and_logs(held_out_run):
    from mlflow.tracking import MlflowClient

    result, out, stdout = held_out_run["result"], held_out_run["out"], held_out_run["stdout"]
    assert "away from a 16-pixel border" in stdout
    rows = [
        line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0].endswith((".png", ".jpg"))
    ]
    assert len(rows) == len(result["cases"])
    for row, case in zip(rows, result["cases"]):
        assert row[:3] == [case["photograph"], case["kernel"], f"{case['noise']:g}"]
        assert [float(v) for v in row[4:]] == pytest.approx([case["input_psnr"], case["psnr"], case["gain"]], abs=0.006)
    summary = result["summary"]
    assert (
        f"{summary['cases']} cases, {summary['improved']} improved; mean gain {summary['mean_gain']:+.2f} dB" in stdout
    )
    worst = summary["worst"]
    assert f"held-out worst case: {worst['photograph']}, {worst['kernel']}, noise {worst['noise']:g}" in stdout
    on_disk = json.loads((out / "held_out.json").read_text())
    assert on_disk["summary"] == summary and on_disk["cases"] == result["cases"]
    # the heat map draws the gains of the JSON (its golf:series text chunk)
    with Image.open(out / "held_out_gain.png") as png:
        series = json.loads(png.text["golf:series"])
    assert len(series["rows"]) == 7 and len(series["columns"]) == len(KERNELS) * len(NOISE)
    assert np.array(series["gain"]).ravel().tolist() == pytest.approx([c["gain"] for c in result["cases"]])
    with Image.open(out / "held_out_clock_motion.png") as png:
        assert png.width > png.height > 100
    client = MlflowClient(tracking_uri=f"sqlite:///{held_out_run['db']}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["golf.stage"] == "held-out" and run.info.status == "FINISHED"
    assert run.data.metrics["held_out_mean_gain"] == pytest.approx(summary["mean_gain"])
    assert run.data.metrics["held_out_improved"] == summary["improved"]
    assert run.data.params["kernels"] == ",".join(KERNELS) and run.data.params["border"] == "16"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == {"figures/held_out_gain.png", "figures/held_out_clock_motion.png"}


def test_summary_counts_means_and_worst():
    def case(name, kernel, noise, gain):
        return {
            "photograph": name,
            "kernel": kernel,
            "noise": noise,
            "gain": gain,
            "input_psnr": 20.0,
            "psnr": 20.0 + gain,
            "psnr_per_iteration": [20.0, 20.0 + gain],
        }

    cases = [
        case("a", "zigzag", 0, 0.5),
        case("a", "zigzag", 5, -0.25),
        case("b", "ring", 0, -1.5),
        case("b", "ring", 5, 2.0),
        case("c", "ring", 0, 0.0),
    ]
    s = summarise(cases)
    assert (s["cases"], s["improved"]) == (5, 2)  # a gain of exactly 0 is no improvement
    assert s["mean_gain"] == pytest.approx(0.15)
    assert s["clean_mean_gain"] == pytest.approx(-1 / 3) and s["noisy_mean_gain"] == pytest.approx(0.875)
    assert s["worst"] == {"photograph": "b", "kernel": "ring", "noise": 0, "gain": -1.5}
    assert s["gain_by_kernel"] == pytest.approx({"zigzag": 0.125, "ring": 1 / 6})
    assert summarise(cases[:1])["noisy_mean_gain"] is None  # no noisy level asked for: no mean, not 0


def test_cases_are_fixed_by_the_seed_and_not_by_the_subset_asked_for():
    every = kernels_of(HeldOutOptions(seed=1))
    assert set(every) == set(HELD_OUT_SHAPES)
    one = kernels_of(HeldOutOptions(kernels=("zigzag",), seed=1))
    assert np.array_equal(one["zigzag"], every["zigzag"])
    assert not np.array_equal(kernels_of(HeldOutOptions(seed=2))["zigzag"], every["zigzag"])


@pytest.fixture(scope="module")
def random_out(tmp_path_factory):
    base = tmp_path_factory.mktemp("held-out-bad")
    db = base / "mlflow.db"
    shutil.copyfile(mlflow_template(), db)
    return write_random_model(base / "run"), f"tracking.uri=sqlite:///{db}"


@pytest.mark.parametrize(
    "flags, status, named",
    [
        (["--held-out", "--held-out-kernels", "zigzag,spiral"], 2, "spiral"),
        (["--held-out", "--held-out-noise", "0,99"], 2, "--held-out-noise"),
        (["--held-out", "--held-out-noise", "five"], 2, "--held-out-noise"),
        (["--held-out", "--held-out-crop", "700"], 2, "camera.png (512x512 pixels)"),
        (["--held-out", "--held-out-crop", "20"], 2, "--held-out-crop must be at least"),
        (["--held-out-crop", "64"], 2, "--held-out-crop applies to --held-out"),
        (["--held-out", "--limit", "2"], 2, "--limit applies to the shards' evaluation"),
        (["--held-out", "--iterations", "auto"], 2, "--iterations auto applies to the shards' evaluation"),
    ],
)
def test_bad_flags_exit_naming_them_before_any_work(random_out, flags, status, named):
    out, store = random_out
    proc = run_cli("launch/evaluate.py", "--output-dir", out, *flags, store)
    assert proc.returncode == status and named in proc.stderr, proc.stderr[-2000:]
    assert not list(out.glob("held_out*"))


def test_a_photograph_that_does_not_load_or_is_smaller_than_the_crop_is_named(random_out, tmp_path):
    out, store = random_out
    small, broken = tmp_path / "small.png", tmp_path / "broken.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(small)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a PNG")
    for photos, status, named in (
        ([small], 2, f"--held-out-crop 128 is larger than held-out photograph {small} (80x60 pixels)"),
        ([broken, small], 1, f"held-out photograph {broken}: image cannot be decoded"),
        ([tmp_path / "gone.png"], 1, f"held-out photograph {tmp_path / 'gone.png'} cannot be read"),
    ):
        proc = run_cli(
            "launch/evaluate.py", "--output-dir", out, "--held-out", "--held-out-crop", "128",
            "--held-out-photographs", *photos, store,
        )  # fmt: skip
        assert proc.returncode == status and named in proc.stderr, proc.stderr[-2000:]
    assert not list(out.glob("held_out*"))


def test_a_side_shorter_than_the_crop_is_kept_whole(random_out, tmp_path):
    """coins.png is 303 pixels high: at the default crop of 384 it is evaluated at 384x303, as this 80x60 one at 70."""
    out, store = random_out
    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(photo)
    proc = run_cli(
        "launch/evaluate.py", "--output-dir", out, "--held-out", "--held-out-crop", "70", "--held-out-kernels",
        "double_exposure", "--held-out-noise", "5", "--held-out-photographs", photo, "--iterations", "1", store,
        check=True,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(c["photograph"], c["size"]) for c in result["cases"]] == [("wide.png", [60, 70])]
    assert result["summary"]["clean_mean_gain"] is None and "noise-free inputs: none asked for" in proc.stdout


def _interior_psnr(image: np.ndarray, sharp: np.ndarray) -> float:
    return float(10 * np.log10(1 / ((image - sharp)[16:-16, 16:-16] ** 2).mean()))


def _scale_cli(out, *flags, check=True):
    return run_cli(
        "launch/diagnose.py", "held-out-scale", "--output-dir", out, "--held-out-crop", CROP,
        "--held-out-seed", SEED, *flags, check=check,
    )  # fmt: skip


def test_scaled_corrections_match_the_evaluation_and_a_computation_of_their_own(held_out_run):
    """diagnose held-out-scale on held_out_run's F + G and cases: at s = 1 each case's gain is the evaluation's;
    at s = 0.5 the gain of the input plus half of F + G's correction, computed here (_own_case); each summary row
    from the cases."""
    out, evaluated = held_out_run["out"], held_out_run["result"]["cases"]
    flags = ("--iterations", ITERATIONS, "--scales", "0.5", "1", "--held-out-kernels", ",".join(KERNELS))
    proc = _scale_cli(out, *flags, "--held-out-noise", "0,5")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["restoration"] == f"F + {ITERATIONS} G" and len(result["cases"]) == len(evaluated)
    for case, ev in zip(result["cases"], evaluated):
        assert [case[k] for k in ("photograph", "kernel", "noise")] == [
            ev[k] for k in ("photograph", "kernel", "noise")
        ]
        assert case["gains"][1] == pytest.approx(ev["gain"], abs=1e-6), case
    f = load_into(f_net(), out / "f.safetensors", "F").eval()
    g = load_into(g_net(), out / "g.safetensors", "G").eval()
    for index, photo in enumerate(held_out_photographs()[:2]):
        image = np.asarray(Image.open(photo.path).convert("RGB"))
        for shape in KERNELS:
            for sigma in NOISE:
                input_psnr, output_psnr = _own_case(image, index, shape, sigma, f, g, scale=0.5)
                case = next(
                    c
                    for c in result["cases"]
                    if (c["photograph"], c["kernel"], c["noise"]) == (photo.name, shape, sigma)
                )
                assert case["gains"][0] == pytest.approx(output_psnr - input_psnr, abs=2 * TOLERANCE), case
    for i, row in enumerate(result["summary"]):
        gains = np.array([c["gains"][i] for c in result["cases"]])
        clean = np.array([c["noise"] == 0 for c in result["cases"]])
        assert row["scale"] == [0.5, 1.0][i] and row["improved"] == int((gains > 0).sum())
        assert row["mean_gain"] == pytest.approx(gains.mean()) and row["clean_mean_gain"] == pytest.approx(
            gains[clean].mean()
        )
        assert row["worst"]["gain"] == gains.min()
        assert f"s={row['scale']:g}: mean {row['mean_gain']:+.2f} dB" in proc.stdout


def test_the_linear_baselines_held_out_gains_match_a_numpy_fit(small_run, shards):
    """--linear-baseline: a 3x3 filter fitted on every pixel of 2 training frames (--samples above their pixel
    count, so the sampling draws them all), against the same least-squares fit made here with numpy, applied to
    the module's blurred crops."""
    from golf_dist.data.torch_loader import ShardPairs
    from golf_dist.evaluation.held_out import crop_box

    flags = ("--linear-baseline", "--shards", shards, "--kernel", "3", "--train-pairs", "2", "--samples", "100000")
    proc = _scale_cli(
        small_run["out"], *flags, "--scales", "1", "--held-out-kernels", "zigzag", "--held-out-noise", "5"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["restoration"] == "the linear 3x3 baseline fitted on 2 training frames"

    def patches(image: np.ndarray) -> np.ndarray:  # HxWx3 in [0, 1] -> (H*W) x 28: 3x3 in each channel, and 1
        height, width = image.shape[:2]
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="reflect")
        cols = [
            padded[dy : dy + height, dx : dx + width, c].ravel() for c in range(3) for dy in range(3) for dx in range(3)
        ]
        return np.stack(cols + [np.ones(height * width)], axis=1)

    train = ShardPairs(shards, "train")
    frames = [[a.astype(np.float64) / 255 for a in train.load(i)[:2]] for i in range(2)]
    weights = np.linalg.lstsq(
        np.concatenate([patches(b) for b, _ in frames]),
        np.concatenate([(s - b).reshape(-1, 3) for b, s in frames]),
        rcond=None,
    )[0]
    kernel = held_out_kernel("zigzag", np.random.default_rng([SEED, HELD_OUT_SHAPES.index("zigzag")]), 17)
    own = []
    for index, photo in enumerate(held_out_photographs()):
        image = np.asarray(Image.open(photo.path).convert("RGB"))
        box = crop_box(*image.shape[:2], CROP)
        top, left, height, width = box
        rng = np.random.default_rng([SEED, index, HELD_OUT_SHAPES.index("zigzag"), 5000])
        blur = blurred_crop(image, box, kernel, 5.0, rng).astype(np.float32).astype(np.float64) / 255
        out = np.clip(blur + (patches(blur) @ weights).reshape(blur.shape), 0, 1)
        sharp = image[top : top + height, left : left + width] / 255

        own.append(_interior_psnr(out, sharp) - _interior_psnr(blur, sharp))
    assert [c["photograph"] for c in result["cases"]] == [p.name for p in held_out_photographs()]
    assert [c["gains"][0] for c in result["cases"]] == pytest.approx(own, abs=1e-4)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--scales", "0", "1"], "--scales takes fractions of the correction above 0"),
        (["--linear-baseline", "--kernel", "4"], "--kernel must be an odd number"),
        (["--held-out-kernels", "spiral"], "spiral"),
        (["--held-out-noise", "99"], "--held-out-noise"),
    ],
)
def test_held_out_scale_refuses_bad_flags_naming_them(random_out, flags, named):
    proc = _scale_cli(random_out[0], *flags, check=False)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
