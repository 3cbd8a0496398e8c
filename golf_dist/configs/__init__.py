"""The configs that ship with the package, and how a command finds one by name.

    demo.yaml, gopro.yaml, gpu_quick.yaml     training configs: `golf-train --config demo` (or a path)
    accelerate/*.yaml, accelerate/*.json      Accelerate launch configs and the DeepSpeed JSON

They are package data (pyproject.toml), so an installed wheel finds them from any folder; in a checkout the
top-level configs/ is a link to this folder, so `--config configs/demo.yaml` reads the same file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from golf_dist.errors import ConfigError

# pip installs a package as plain files: the folder is a real path
BUNDLED_CONFIGS = Path(str(resources.files(__name__)))
ACCELERATE_CONFIGS = BUNDLED_CONFIGS / "accelerate"
DEFAULT_CONFIG = BUNDLED_CONFIGS / "demo.yaml"  # the embedded default: synthetic data the project makes itself
PAPER_CONFIG = BUNDLED_CONFIGS / "gopro.yaml"  # the paper's recipe on GoPro


def bundled_names(folder: Path = BUNDLED_CONFIGS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _bundled(given: str | Path, folder: Path) -> Path | None:
    """The bundled file a bare name (demo, demo.yaml) stands for, when `given` is not a path that exists."""
    path = Path(given)
    if path.exists() or len(path.parts) != 1:
        return None
    bundled = folder / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return bundled if bundled.is_file() else None


def config_path(config: str | Path | None) -> Path:
    """The YAML file --config names: a path, or the name of a bundled config (demo, gopro, gpu_quick.yaml);
    None is the embedded default (demo). Neither a file nor a bundled name is a ConfigError listing the names."""
    if config is None:
        return DEFAULT_CONFIG
    path = _bundled(config, BUNDLED_CONFIGS) or Path(config)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"--config {config} is not a file")
    raise ConfigError(
        f"--config {config}: no such file, nor a bundled config name (bundled: {', '.join(bundled_names())})"
    )


def accelerate_config_path(config: str | Path) -> Path:
    """An `accelerate launch --config_file` as given, or the bundled one a bare name stands for (single_gpu,
    one_node, multi_node, deepspeed_zero2); a name that is neither is a ConfigError listing the bundled ones."""
    path = Path(config)
    if path.exists() or len(path.parts) != 1:
        return path
    bundled = _bundled(config, ACCELERATE_CONFIGS)
    if bundled is None:
        raise ConfigError(
            f"accelerate config {config} does not exist, nor is it a bundled one "
            f"({', '.join(bundled_names(ACCELERATE_CONFIGS))})"
        )
    return bundled


def _is_bundled(path: Path) -> bool:
    return path.resolve().parent == ACCELERATE_CONFIGS.resolve()


def bundled_deepspeed_json(ds_file: str, config: Path) -> str:
    """The DeepSpeed JSON launch config `config` names. A relative path is read from where you launch; a bundled
    config's (configs/accelerate/deepspeed_zero2.json) is found in the package where it is not there (a wheel)."""
    in_package = BUNDLED_CONFIGS.parent / ds_file
    if _is_bundled(config) and not Path(ds_file).is_absolute() and not Path(ds_file).exists() and in_package.is_file():
        return str(in_package)
    return ds_file


def bundled_launch_args(args: list[str]) -> list[str]:
    """`accelerate launch` arguments with a bundled --config_file name (one_node) as its path, and the path of the
    DeepSpeed JSON such a config names where only the package has it (bundled_deepspeed_json)."""
    for i, arg in enumerate(args):
        if arg == "--":  # the script's own arguments follow
            break
        inline = arg.startswith("--config_file=")
        if not inline and (arg != "--config_file" or i + 1 == len(args)):
            continue
        path = accelerate_config_path(arg.split("=", 1)[1] if inline else args[i + 1])
        extra = []
        if "--deepspeed_config_file" not in args and _is_bundled(path):
            import yaml  # a bundled config: valid YAML

            named = (yaml.safe_load(path.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
            if named and bundled_deepspeed_json(named, path) != named:
                extra = ["--deepspeed_config_file", bundled_deepspeed_json(named, path)]
        return [*args[:i], "--config_file", str(path), *extra, *args[i + (1 if inline else 2) :]]
    return args
