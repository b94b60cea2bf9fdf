"""The sweep grid: the YAML of dotted key -> values, its configs in a fixed order, and trial commands.

A grid config ``c{i}`` plus ``data.fold=k`` is one trial; ``trial_command`` is the exact
``distrib train`` command that replays it by hand.
"""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import yaml

from distrib.config import ConfigError, read_yaml_mapping
from distrib.config.fields import closest_key
from distrib.errors import DistribError

DISTRIBUTIONS = {  # grid YAML name -> what its arguments must be (ray.tune.<name> samples it)
    "loguniform": "[low, high] with 0 < low < high",
    "uniform": "[low, high] with low < high",
    "randint": "[low, high] integers with low < high (high exclusive)",
    "choice": "a non-empty list of values",
}


def load_grid(path: str | Path) -> dict[str, list]:
    """Read a grid YAML (``dotted.key: [values]``) and check every key against the config schema."""
    grid = read_yaml_mapping(
        path,
        "grid file",
        "; pass --grid with a YAML of dotted key -> list of values",
        "dotted keys mapped to lists, e.g. 'optim.lr: [5.0e-5, 1.0e-4]'",
    )
    if isinstance(grid.get("grid"), dict):  # also accept a 'grid:' wrapper
        grid = grid["grid"]
    return check_grid(grid, str(path))


def check_grid(grid: dict, origin: str = "tune.grid") -> dict[str, list | dict]:
    """Validate grid shape (lists, or one ``{distribution: args}`` for random/optuna search); values are
    checked later by building every config (``search.validation_configs``)."""
    out = {}
    for key, values in grid.items():
        if isinstance(values, dict):
            values = check_distribution(str(key), values, origin)
        elif not isinstance(values, list) or not values:
            raise ConfigError(
                f"{origin}: '{key}' must be a non-empty list of values (or a distribution such as "
                f"{{loguniform: [1.0e-5, 1.0e-3]}}), got {values!r}"
            )
        if key == "data.fold":
            raise ConfigError(f"{origin}: 'data.fold' is swept automatically (tune.folds); remove it from the grid")
        out[str(key)] = values
    return out


def check_distribution(key: str, spec: dict, origin: str) -> dict:
    """``{loguniform|uniform: [low, high]}``, ``{randint: [low, high]}`` (high exclusive) or ``{choice: [...]}``."""
    if len(spec) != 1:
        raise ConfigError(
            f"{origin}: '{key}' must map one distribution name to its arguments, e.g. "
            f"{{loguniform: [1.0e-5, 1.0e-3]}}; got {spec!r}"
        )
    ((name, args),) = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"{origin}: '{key}' has unknown distribution '{name}' (known: {', '.join(DISTRIBUTIONS)})"
            + closest_key(str(name), DISTRIBUTIONS)
        )
    if name == "choice":
        ok = isinstance(args, list) and len(args) >= 1
    else:
        ok = (
            isinstance(args, list)
            and len(args) == 2
            and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]
            and (name != "loguniform" or args[0] > 0)
            and (name != "randint" or all(isinstance(a, int) for a in args))
        )
    if not ok:
        raise ConfigError(f"{origin}: '{key}': {{{name}: {args!r}}} needs {DISTRIBUTIONS[name]}")
    return {name: list(args)}


def is_sampled(values) -> bool:
    """A grid entry that is a distribution (only random/optuna search can sample it)."""
    return isinstance(values, dict)


def _fmt(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def grid_configs(grid: dict[str, list]) -> list[dict]:
    """Cross product in a fixed order: ``[{"id": "c0", "overrides": ["optim.lr=5e-05", ...]}, ...]``."""
    keys = list(grid)
    out = []
    for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        out.append(
            {"id": f"c{i}", "params": dict(zip(keys, values)), "overrides": params_overrides(dict(zip(keys, values)))}
        )
    return out or [{"id": "c0", "params": {}, "overrides": []}]


def params_overrides(params: dict) -> list[str]:
    """``{"optim.lr": 0.001}`` -> ``["optim.lr=0.001"]`` (values YAML-formatted, so they parse back exactly)."""
    return [f"{k}={_fmt(v)}" for k, v in params.items()]


def config_id(grid: dict[str, list], params: dict) -> str:
    """The ``c{i}`` id of a parameter combination (its index in ``grid_configs`` order)."""
    for c in grid_configs(grid):
        if all(c["params"][k] == params.get(k) for k in c["params"]):
            return c["id"]
    raise DistribError(f"parameters {params} are not in the sweep grid {grid}")


def trial_overrides(overrides: list[str], fold: int) -> list[str]:
    return [*overrides, f"data.fold={fold}"]


def trial_command(config_path: str | Path, run_dir: str | Path, overrides: list[str]) -> str:
    """The CLI command that replays a trial by hand (``--resume`` continues it)."""
    return shlex.join(["distrib", "train", str(config_path), "--out", str(run_dir), *overrides])
