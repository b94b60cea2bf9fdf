"""The recipe YAML (``distrib run RECIPE.yaml --out DIR``): one whole plan, from manifests to the cascade report.

Format (relative paths resolve against the recipe's own folder; unknown keys are errors naming the
closest valid key)::

    name: my_cascade
    mode: cascade               # or shootout: the experts are candidates compared side by side (recipes/shootout.py)
    data:                       # the manifests, or existing shards (then the shard settings are unused)
      train: data/train.csv     # train manifest CSV (path,label[,group])
      val: data/val.csv
      test: data/test.csv
      shards: ""                # an existing shard dir instead of the manifests; '' = write DIR/shards
      folds: 5                  # group-aware CV folds
      seed: 0
      shard_size: 1000
      positive: ""              # class name that becomes label 1; '' = real/fake
    overrides: []               # dotted experiment overrides applied to stage 1 and every expert
    stage1:
      experiment: ../configs/experiments/deepfake_stage1_mobilenetv4.yaml
      overrides: []
      accelerate_config: ""     # e.g. ../../accelerate_config.yaml: stage 1 as `accelerate launch` (DDP on every GPU)
    experts:                    # two or more stage-2 experts, each swept over its grid x the folds
      - {experiment: ../configs/experiments/deepfake_expert_effnetv2_b3.yaml, grid: ../configs/grids/expert_effnetv2_b3.yaml}
      - {experiment: ../configs/experiments/deepfake_expert_genconvit_ed.yaml, grid: ../configs/grids/expert_genconvit_ed.yaml}
    stack: {}                   # the stack section of an experiment config (features, folds, n_estimators, ...)
    thresholds: {}              # the thresholds section (recall, specificity, bootstrap, ...)
    cascade: {batch_size: 64, rule: youden}
    shootout: {latency_ms: 16.0, size_mb: 0, student: ""}   # mode: shootout only (targets; distilled student YAML)

Dotted overrides on the command line address the recipe's keys (``data.folds=2``,
``stack.n_estimators=30``); an experiment-only key (``train.epochs=1``, ``data.img_size=32``) or
``overrides.KEY=V`` appends ``KEY=V`` to the overrides of every experiment, ``stage1.overrides.KEY=V``
to stage 1's. Paths given on the command line resolve against the current folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrib.config import SECTIONS as EXPERIMENT_SECTIONS
from distrib.config import ConfigError, StackConfig, ThresholdConfig, parse_override, read_yaml_mapping
from distrib.config.fields import Section, check_choice, check_value, closest_key, field_docs

RULES = ("youden", "f1", "max_specificity_at_recall")


@dataclass
class RecipeData(Section):
    _prefix = "data"
    train: str = field(
        default="", metadata={"doc": "train manifest CSV (path,label[,group]); '' when data.shards is given"}
    )
    val: str = field(
        default="", metadata={"doc": "val manifest CSV (stage 1 validates on it; thresholds may fit on it)"}
    )
    test: str = field(default="", metadata={"doc": "test manifest CSV (the cascade's report split)"})
    shards: str = field(
        default="",
        metadata={"doc": "an existing shard dir (with index.json) instead of the manifests; '' = DIR/shards"},
    )
    folds: int = field(default=5, metadata={"doc": "group-aware CV folds of the shards and the sweeps"})
    seed: int = field(default=0, metadata={"doc": "fold assignment and shard order seed"})
    shard_size: int = field(default=1000, metadata={"doc": "max samples per shard"})
    workers: int = field(default=2, metadata={"doc": "shard writer processes"})
    positive: str = field(
        default="", metadata={"doc": "class name that becomes label 1 (case-insensitive); '' = real/fake"}
    )
    classes: dict = field(
        default_factory=dict,
        metadata={
            "doc": "names of labels 0/1 in the index and every report ({negative: NAME, positive: NAME}); "
            "{} = the manifests' own class names, or negative/positive for integer labels"
        },
    )

    def validate(self) -> None:
        check_value(
            bool(self.shards) or bool(self.train and self.test),
            "data",
            "train/test or shards",
            "data.train and data.test manifests, or data.shards",
        )
        check_value(self.folds >= 2, "data.folds", self.folds, ">= 2")
        if self.classes:
            from distrib.data.manifest import parse_names

            parse_names(self.classes)  # a bad pair fails here, before any step starts
        check_value(self.shard_size >= 1, "data.shard_size", self.shard_size, ">= 1")
        check_value(self.workers >= 1, "data.workers", self.workers, ">= 1")


@dataclass
class RecipeStage1(Section):
    _prefix = "stage1"
    experiment: str = field(
        default="", metadata={"doc": "stage-1 (filter) experiment YAML; trained on every fold, validated on val"}
    )
    overrides: list[str] = field(default_factory=list, metadata={"doc": "dotted overrides of that experiment"})
    accelerate_config: str = field(
        default="",
        metadata={"doc": "train stage 1 under `accelerate launch --config_file` (DDP/DeepSpeed); '' = in-process"},
    )
    accelerate_args: list[str] = field(
        default_factory=list, metadata={"doc": 'extra `accelerate launch` flags, e.g. [--num_processes, "4"]'}
    )


@dataclass
class RecipeExpert(Section):
    _prefix = "experts[]"
    experiment: str = field(default="", metadata={"doc": "expert experiment YAML"})
    grid: str = field(default="", metadata={"doc": "its sweep grid YAML; '' = the experiment's tune.grid"})
    overrides: list[str] = field(default_factory=list, metadata={"doc": "dotted overrides of that experiment"})

    def validate(self) -> None:
        check_value(bool(self.experiment), "experts[].experiment", self.experiment, "an experiment YAML")


@dataclass
class RecipeCascade(Section):
    _prefix = "cascade"
    batch_size: int = field(default=64, metadata={"doc": "streamed batch size"})
    rule: str = field(default="youden", metadata={"doc": "which OOF-fit threshold decides stage 3"})
    evaluate_all_stages: bool = field(
        default=True, metadata={"doc": "also run stages 2+3 on every sample (per-stage metrics)"}
    )
    split: str = field(default="test", metadata={"doc": "split the cascade reports on"})

    def validate(self) -> None:
        check_value(self.batch_size >= 1, "cascade.batch_size", self.batch_size, ">= 1")
        check_choice("cascade.rule", self.rule, RULES)
        check_choice("cascade.split", self.split, ("val", "test"))


@dataclass
class RecipeShootout(Section):
    _prefix = "shootout"
    latency_ms: float = field(default=0.0, metadata={"doc": "CPU latency target at batch 1, ms/img; 0 = no target"})
    size_mb: float = field(default=0.0, metadata={"doc": "model file size target in MB; 0 = no target"})
    student: str = field(
        default="",
        metadata={"doc": "experiment YAML of the distilled student (train.distill_teacher is set); '' = none"},
    )
    student_overrides: list[str] = field(
        default_factory=list, metadata={"doc": "dotted overrides of the student experiment"}
    )

    def validate(self) -> None:
        check_value(self.latency_ms >= 0, "shootout.latency_ms", self.latency_ms, ">= 0")
        check_value(self.size_mb >= 0, "shootout.size_mb", self.size_mb, ">= 0")


@dataclass
class Recipe:
    name: str = field(default="recipe", metadata={"doc": "report title"})
    mode: str = field(
        default="cascade",
        metadata={"doc": "cascade (stage 1 -> experts -> stack) or shootout (candidates side by side)"},
    )
    data: RecipeData = field(default_factory=RecipeData)
    overrides: list[str] = field(
        default_factory=list, metadata={"doc": "dotted overrides applied to stage 1 and every expert"}
    )
    stage1: RecipeStage1 = field(default_factory=RecipeStage1)
    experts: list[RecipeExpert] = field(
        default_factory=list, metadata={"doc": "the stage-2 experts (cascade: two or more)"}
    )
    stack: StackConfig = field(default_factory=StackConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    cascade: RecipeCascade = field(default_factory=RecipeCascade)
    shootout: RecipeShootout = field(default_factory=RecipeShootout)


SECTIONS = {
    "data": RecipeData,
    "stage1": RecipeStage1,
    "stack": StackConfig,
    "thresholds": ThresholdConfig,
    "cascade": RecipeCascade,
    "shootout": RecipeShootout,
}
TOP = ("name", "mode", "overrides", "experts", *SECTIONS)
PATHS = {
    "data": ("train", "val", "test", "shards"),
    "stage1": ("experiment", "accelerate_config"),
    "experts": ("experiment", "grid"),
    "shootout": ("student",),
}


EXPERIMENT_ONLY = tuple(k for k in EXPERIMENT_SECTIONS if k not in SECTIONS)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section(cls, value: Any, key: str, origin: str):
    if not isinstance(value, dict):
        raise ConfigError(f"recipe key '{key}' in {origin} must be a mapping of {', '.join(_names(cls))}")
    for k in value:
        if k not in _names(cls):
            raise ConfigError(
                f"unknown recipe key '{key}.{k}' in {origin}"
                f"{closest_key(f'{key}.{k}', [f'{key}.{n}' for n in _names(cls)], field_docs(cls, f'{key}.'))}"
            )
    return cls(**value)


def _resolve(tree: dict, base: Path) -> dict:
    """Make the recipe's path fields absolute against ``base`` (URLs and '' stay as they are)."""

    def fix(v):
        return (
            str((base / v).resolve())
            if isinstance(v, str) and v and "://" not in v and not v.startswith("pipe:")
            else v
        )

    for sec, keys in PATHS.items():
        items = tree.get(sec)
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, dict):
                for k in keys:
                    if k in item:
                        item[k] = fix(item[k])
    return tree


def _apply(tree: dict, text: str) -> None:
    key, value = parse_override(text)
    parts = key.split(".")
    if len(parts) > 1 and (parts[0] in EXPERIMENT_ONLY or (parts[0] == "data" and parts[1] not in _names(RecipeData))):
        if parts[0] == "data" and len(parts) == 2 and parts[1] not in _names(EXPERIMENT_SECTIONS["data"]):
            names = [f"data.{n}" for n in (*_names(RecipeData), *_names(EXPERIMENT_SECTIONS["data"]))]
            docs = {**field_docs(EXPERIMENT_SECTIONS["data"], "data."), **field_docs(RecipeData, "data.")}
            raise ConfigError(
                f"unknown key '{key}' in command-line overrides (neither a recipe data key nor an "
                f"experiment data key){closest_key(key, names, docs)}"
            )  # suggested from both, recipe first
        tree.setdefault("overrides", []).append(text)  # an experiment key: applies to every experiment
        return
    if parts[0] not in TOP:
        raise ConfigError(f"unknown recipe key '{key}' in command-line overrides{closest_key(parts[0], TOP)}")
    if parts[0] == "overrides" and len(parts) > 1:  # overrides.train.epochs=1: append one experiment override
        tree.setdefault("overrides", []).append(f"{'.'.join(parts[1:])}={text.split('=', 1)[1]}")
        return
    if parts[:2] == ["stage1", "overrides"] and len(parts) > 2:
        tree.setdefault("stage1", {}).setdefault("overrides", []).append(
            f"{'.'.join(parts[2:])}={text.split('=', 1)[1]}"
        )
        return
    if len(parts) == 1:
        tree[key] = _resolve({key: value}, Path.cwd())[key]
    elif len(parts) == 2 and parts[0] in SECTIONS:
        if parts[1] not in _names(SECTIONS[parts[0]]):
            names = [f"{parts[0]}.{n}" for n in _names(SECTIONS[parts[0]])]
            docs = field_docs(SECTIONS[parts[0]], f"{parts[0]}.")
            raise ConfigError(f"unknown recipe key '{key}' in command-line overrides{closest_key(key, names, docs)}")
        tree.setdefault(parts[0], {})
        if not isinstance(tree[parts[0]], dict):
            raise ConfigError(f"recipe key '{parts[0]}' must be a mapping")
        tree[parts[0]][parts[1]] = _resolve({parts[0]: {parts[1]: value}}, Path.cwd())[parts[0]][parts[1]]
    else:
        raise ConfigError(
            f"recipe override '{text}': use SECTION.KEY=VALUE (sections: {', '.join(SECTIONS)}), "
            "overrides.KEY=VALUE or stage1.overrides.KEY=VALUE"
        )


def recipe_tree(path: str | Path, overrides=()) -> dict:
    """The recipe file as a plain mapping: paths absolute, command-line ``overrides`` applied."""
    path = Path(path)
    tree = read_yaml_mapping(
        path,
        what="recipe",
        missing_hint=" (ship recipes live in launch/recipes/)",
        shape_hint="a mapping of recipe keys (name, data, stage1, experts, ...)",
    )
    tree = _resolve(tree, path.resolve().parent)
    for text in overrides:
        _apply(tree, text)
    return tree


def build_recipe(tree: dict, origin: str = "recipe") -> Recipe:
    """Validate a recipe mapping; every unknown key fails naming the closest valid one."""
    for k in tree:
        if k not in TOP:
            raise ConfigError(f"unknown recipe key '{k}' in {origin}{closest_key(k, TOP)}")
    kwargs: dict[str, Any] = {k: _section(cls, tree.get(k) or {}, k, origin) for k, cls in SECTIONS.items()}
    mode = tree.get("mode") or "cascade"
    check_choice("mode", mode, ("cascade", "shootout"))
    kwargs["mode"] = mode
    experts = tree.get("experts") or []
    if not isinstance(experts, list) or len(experts) < (2 if mode == "cascade" else 1):
        raise ConfigError(
            f"recipe key 'experts' in {origin} must list two or more experts "
            "({experiment: YAML, grid: YAML}); the stack combines them"
            if mode == "cascade"
            else f"recipe key 'experts' in {origin} must list the shoot-out's candidates "
            "({experiment: YAML, grid: YAML})"
        )
    if mode == "cascade" and not kwargs["stage1"].experiment:
        raise ConfigError(
            f"recipe key 'stage1.experiment' in {origin} is empty; a cascade needs its stage-1 "
            "experiment YAML (or set mode: shootout)"
        )
    kwargs["experts"] = [_section(RecipeExpert, e, f"experts[{i}]", origin) for i, e in enumerate(experts)]
    for key in ("overrides",):
        value = tree.get(key) or []
        check_value(
            isinstance(value, list) and all(isinstance(v, str) for v in value),
            key,
            value,
            "a list of dotted overrides such as train.epochs=1",
        )
        kwargs[key] = list(value)
    kwargs["name"] = str(tree.get("name") or Path(origin).stem)
    return Recipe(**kwargs)


def load_recipe(path: str | Path, overrides=()) -> Recipe:
    """Resolve the recipe at ``path`` with command-line ``overrides`` into a validated ``Recipe``."""
    return build_recipe(recipe_tree(path, overrides), str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
