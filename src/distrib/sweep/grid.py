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
from distrib.errors import DistribError


def load_grid(path: str | Path) -> dict[str, list]:
    """Read a grid YAML (``dotted.key: [values]``) and check every key against the config schema."""
    grid = read_yaml_mapping(path, "grid file", "; pass --grid with a YAML of dotted key -> list of values",
                             "dotted keys mapped to lists, e.g. 'optim.lr: [5.0e-5, 1.0e-4]'")
    if isinstance(grid.get("grid"), dict):  # also accept a 'grid:' wrapper
        grid = grid["grid"]
    return check_grid(grid, str(path))


def check_grid(grid: dict, origin: str = "tune.grid") -> dict[str, list]:
    """Validate grid shape; values are checked later by building every config."""
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{origin}: '{key}' must be a non-empty list of values, got {values!r}")
        if key == "data.fold":
            raise ConfigError(f"{origin}: 'data.fold' is swept automatically (tune.folds); remove it from the grid")
        out[str(key)] = values
    return out


def _fmt(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def grid_configs(grid: dict[str, list]) -> list[dict]:
    """Cross product in a fixed order: ``[{"id": "c0", "overrides": ["optim.lr=5e-05", ...]}, ...]``."""
    keys = list(grid)
    out = []
    for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        out.append({"id": f"c{i}", "params": dict(zip(keys, values)),
                    "overrides": [f"{k}={_fmt(v)}" for k, v in zip(keys, values)]})
    return out or [{"id": "c0", "params": {}, "overrides": []}]


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
