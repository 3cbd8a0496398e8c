from pathlib import Path

import pytest

from golf_dist.config import DEFAULT_CONFIG, flatten, load_config, to_dict
from golf_dist.errors import ConfigError

from conftest import run_cli


def test_paper_recipe_loads_with_stage_sections():
    f = load_config(DEFAULT_CONFIG, stage="f")
    g = load_config(DEFAULT_CONFIG, stage="g")
    assert f.train.steps == 500_000 and g.train.steps == 200_000
    assert f.loss.perceptual_weight == pytest.approx(5e-6)
    assert f.data.crop == 256 and f.data.batch_size == 4
    assert f.train.lr_gamma == pytest.approx(0.3) and f.train.lr_decays == 11


def test_demo_config_loads():
    cfg = load_config(Path(DEFAULT_CONFIG).parent / "demo.yaml", stage="g")
    assert cfg.train.unroll == 3 and cfg.loss.perceptual_weight == 0
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.ema_decay) == ("cosine", 20, 0.99)


def test_overrides_are_parsed_by_type():
    cfg = load_config(
        DEFAULT_CONFIG,
        stage="f",
        overrides=["train.lr=5e-4", "data.batch_size=8", "train.gradient_checkpointing=false",
                   "loss.vgg_weights=/x/vgg.pth", "train.mixed_precision=bf16", "output_dir=runs/x"],
    )
    assert cfg.train.lr == pytest.approx(5e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 8 and cfg.train.gradient_checkpointing is False
    assert cfg.loss.vgg_weights == "/x/vgg.pth" and cfg.train.mixed_precision == "bf16"
    assert load_config(DEFAULT_CONFIG, overrides=["loss.vgg_weights=null"]).loss.vgg_weights is None


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lrr=1", "train.lrr"),
        ("trian.lr=1", "trian"),
        ("data.crop=abc", "data.crop"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing"),
        ("train.unroll=0", "train.unroll"),
        ("train.lr=-1", "train.lr"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.crop=16", "data.crop"),
    ],
)
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(DEFAULT_CONFIG, stage="g", overrides=[override])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        load_config(DEFAULT_CONFIG, overrides=["train.lrr=1"])


def test_unknown_key_in_a_stage_section_of_a_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\ng:\n  train:\n    stepz: 5\n")
    with pytest.raises(ConfigError, match=r"g\.train\.stepz"):
        load_config(bad, stage="f")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_gives_dotted_params():
    flat = flatten(to_dict(load_config(DEFAULT_CONFIG)))
    assert flat["train.lr"] == pytest.approx(1e-3) and flat["data.shards"] == "GOPRO_shards"


@pytest.mark.parametrize(
    "args, named",
    [
        (["--stage", "g", "--unroll", "0"], "train.unroll"),
        (["--stage", "f", "train.stepz=3"], "train.stepz"),
        (["--stage", "f", "data.crop=big"], "data.crop"),
        (["--stage", "f", "stray"], "stray"),
    ],
)
def test_train_cli_rejects_bad_config_with_exit_2_before_work(tmp_path, args, named):
    out = tmp_path / "run"
    proc = run_cli("launch/train.py", *args, "--output-dir", out)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_help_of_every_command_line():
    for script in ("launch/train.py", "launch/evaluate.py", "launch/deblur.py", "launch/benchmark.py",
                   "data_prep/synth_gopro.py", "data_prep/shard_gopro.py"):
        proc = run_cli(script, "--help", fresh=True)  # a new interpreter: --help must not wait on heavy imports
        assert proc.returncode == 0, (script, proc.stderr)
        assert "usage" in proc.stdout.lower()


def test_yaml_boolean_words_stay_words_for_text_keys():
    cfg = load_config(DEFAULT_CONFIG, stage="f", overrides=["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):  # a bool key still wants a bool
        load_config(DEFAULT_CONFIG, stage="f", overrides=["train.gradient_checkpointing=maybe"])
