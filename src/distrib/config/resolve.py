"""Resolving a config: defaults, then the experiment YAML (with ``base:``), then dotted CLI overrides.

Unknown keys fail with the closest valid key; the resolved config is saved beside every run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from distrib.atomic import write_text
from distrib.config.fields import closest_key, field_docs
from distrib.config.schema import SECTIONS, TOP_LEVEL, ExperimentConfig
from distrib.errors import ConfigError


def parse_override(text: str) -> tuple[str, Any]:
    """Parse 'section.key=value' (value is YAML: numbers, bools, lists) into (dotted key, value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value {raw!r} is not valid YAML ({e})") from e
    return key, value


def set_dotted(tree: dict, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    if parts[0] not in TOP_LEVEL:
        raise ConfigError(f"unknown config key '{key}' in {origin}{closest_key(parts[0], TOP_LEVEL)}")
    if parts[0] == "name":
        if len(parts) != 1:
            raise ConfigError(f"unknown config key '{key}' in {origin}; 'name' has no sub-keys")
        tree["name"] = value
        return
    section = SECTIONS[parts[0]]
    names = [f.name for f in dataclasses.fields(section)]
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' in {origin} must be a mapping of {', '.join(names)}")
        for k, v in value.items():
            set_dotted(tree, f"{key}.{k}", v, origin)
        return
    field_name = parts[1]
    if field_name not in names:
        raise ConfigError(
            f"unknown config key '{parts[0]}.{field_name}' in {origin}"
            f"{closest_key(key, [f'{parts[0]}.{n}' for n in names], field_docs(section, f'{parts[0]}.'))}"
        )
    sec = tree.setdefault(parts[0], {})
    if len(parts) == 2:
        sec[field_name] = value
    elif field_name in ("kwargs", "grid"):  # free-form mappings: model.kwargs.depth=3
        sub = sec.setdefault(field_name, {})
        sub[".".join(parts[2:])] = value
    else:
        raise ConfigError(f"unknown config key '{key}' in {origin}: '{parts[0]}.{field_name}' has no sub-keys")


def read_yaml_mapping(
    path: str | Path, what: str = "config file", missing_hint: str = "", shape_hint: str = "a mapping of sections"
) -> dict:
    """Read a YAML file that must hold a mapping; each failure names the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}{missing_hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold {shape_hint}, got {type(data).__name__}")
    return data


def _read_yaml(path: Path, seen: tuple = (), parent: Path | None = None) -> dict:
    """Read an experiment YAML; a top-level 'base: other.yaml' is merged underneath it."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base:'")
    hint = f" (named by 'base: {path.name}' in {parent}; the path is relative to that file's folder)" if parent else ""
    data = read_yaml_mapping(path, missing_hint=hint)
    base = data.pop("base", None)
    tree: dict = {}
    if base:
        tree = _read_yaml((path.parent / base), seen + (path.resolve(),), parent=path)
    for k, v in data.items():
        _merge(tree, k, v, str(path))
    return tree


def _merge(tree: dict, key: str, value: Any, origin: str) -> None:
    if isinstance(value, dict) and key in SECTIONS:
        for k, v in value.items():
            _merge(tree, f"{key}.{k}", v, origin)
    else:
        set_dotted(tree, key, value, origin)


def build_config(tree: dict) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a nested dict (unknown keys are errors)."""
    flat: dict = {}
    for k, v in tree.items():
        _merge(flat, k, v, "config")
    kwargs: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        kwargs[name] = section(**flat.get(name, {}))
    if "name" in flat:
        kwargs["name"] = str(flat["name"])
    return ExperimentConfig(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> ExperimentConfig:
    """Resolve defaults, then the experiment YAML at ``path``, then dotted ``overrides``."""
    tree: dict = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value, "command-line overrides")
    return build_config(tree)


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_to_overrides(cfg: ExperimentConfig) -> list[str]:
    """The dotted overrides that rebuild ``cfg`` from defaults (fields that differ from defaults)."""
    default = config_to_dict(ExperimentConfig())
    out = []
    cur = config_to_dict(cfg)
    if cur["name"] != default["name"]:
        out.append(f"name={cur['name']}")
    for sec in SECTIONS:
        for k, v in cur[sec].items():
            if v != default[sec][k]:
                out.append(
                    f"{sec}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                )
    return out


def save_config(cfg: ExperimentConfig, out_dir: str | Path) -> Path:
    """Write the resolved config to ``out_dir/config.yaml`` (replayable with ``distrib train``)."""
    return write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
