import typing
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from golf_dist.config import Config, Loader, choice_fields, flatten, load_config, to_dict, validate
from golf_dist.configs import BUNDLED_CONFIGS, DEFAULT_CONFIG, PAPER_CONFIG
from golf_dist.errors import ConfigError


def test_paper_recipe_loads_with_stage_sections():
    f = load_config(PAPER_CONFIG, stage="f")
    g = load_config(PAPER_CONFIG, stage="g")
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
        overrides=[
            "train.lr=5e-4",
            "data.batch_size=8",
            "train.gradient_checkpointing=false",
            "loss.vgg_weights=/x/vgg.pth",
            "train.mixed_precision=bf16",
            "output_dir=runs/x",
        ],
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
    flat = flatten(to_dict(load_config(PAPER_CONFIG)))
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


@pytest.mark.slow
def test_help_of_every_command_line():
    for script in (
        "launch/train.py",
        "launch/evaluate.py",
        "launch/deblur.py",
        "launch/benchmark.py",
        "data_prep/synth_gopro.py",
        "data_prep/shard_gopro.py",
    ):
        proc = run_cli(script, "--help", fresh=True)  # a new interpreter: --help must not wait on heavy imports
        assert proc.returncode == 0, (script, proc.stderr)
        assert "usage" in proc.stdout.lower()


def test_yaml_boolean_words_stay_words_for_text_keys():
    cfg = load_config(DEFAULT_CONFIG, stage="f", overrides=["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):  # a bool key still wants a bool
        load_config(DEFAULT_CONFIG, stage="f", overrides=["train.gradient_checkpointing=maybe"])


def test_the_default_is_the_bundled_demo_and_the_checkouts_configs_are_the_bundled_ones():
    """The embedded default (README) is demo.yaml, shipped inside the package; the top-level configs/ that users
    type is the same folder, so `--config configs/demo.yaml` and `--config demo` read one file."""
    assert DEFAULT_CONFIG == BUNDLED_CONFIGS / "demo.yaml" and BUNDLED_CONFIGS.parent.name == "golf_dist"
    assert (ROOT / "configs" / "demo.yaml").resolve() == DEFAULT_CONFIG.resolve()
    default, by_name = load_config(None, "f"), load_config("demo", "f")
    assert default == by_name == load_config(ROOT / "configs/demo.yaml", "f")
    assert default.data.shards == "runs/demo/shards"
    assert load_config("gopro.yaml", "f") == load_config(ROOT / "configs" / "gopro.yaml", "f")
    assert load_config("gpu_quick", "f").data.crop != default.data.crop  # a name picks its own file


def test_an_unknown_config_name_lists_the_bundled_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"--config nope: .*bundled: demo, gopro, gpu_quick"):
        load_config("nope")
    with pytest.raises(ConfigError, match=r"is not a file"):
        load_config(tmp_path)
    proc = run_cli("launch/train.py", "--config", "demoo", "--stage", "f", "--output-dir", tmp_path / "run")
    assert proc.returncode == 2 and "--config demoo" in proc.stderr and "demo, gopro, gpu_quick" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_choice_fields_are_declared_once_as_literals():
    """Every choice field's allowed values come from its Literal: validation names them, the loaders use them."""
    from golf_dist.data.loaders import LOADERS

    choices = choice_fields()
    assert choices["data.loader"] == typing.get_args(Loader) == LOADERS == ("auto", "dali", "torch")
    assert {
        "data.on_bad_sample",
        "train.schedule",
        "train.unroll_weighting",
        "train.mixed_precision",
        "train.nonfinite",
        "speed.compile",
        "speed.cuda_graphs",
    } <= set(choices)
    for key, allowed in choices.items():
        for value in allowed:  # every declared value passes (YAML reads no/on/off as booleans: kept as words)
            load_config(
                PAPER_CONFIG,
                "f",
                [f"{key}={value}", "speed.compile=auto"] if key == "speed.cuda_graphs" else [f"{key}={value}"],
            )
        with pytest.raises(ConfigError) as err:
            load_config(PAPER_CONFIG, "f", [f"{key}=bogus"])
        assert str(err.value).startswith(f"config key '{key}' must be ") and all(v in str(err.value) for v in allowed)
    cfg = Config()
    cfg.train.schedule = "linear"  # built in code, not parsed: validate() still checks the Literal
    with pytest.raises(ConfigError, match=r"'train.schedule' must be exp, cosine or constant, got 'linear'"):
        validate(cfg)
