"""The cascade YAML (``distrib cascade --config CASCADE.yaml``): which runs form stages 1-3, and how they decide.

Format (relative paths resolve against the YAML's own folder; unknown keys are errors naming the
closest valid key)::

    name: cascade_deepfake
    shards: ""                # shard dir/URL with index.json; '' = stage 1 run's data.shards
    batch_size: 64            # samples per streamed batch
    num_workers: 0            # loader worker processes
    device: auto              # auto (cuda if available), cpu or cuda
    recall: 0.99              # stage-1 band: auto-decided recall >= R ...
    specificity: 0.95         # ... and specificity >= S (fit on stage 1's val predictions, never test)
    evaluate_all_stages: true # also run stages 2+3 on every sample (per-stage metrics, "always 2+3" cost)
    expert_models: auto       # auto (the refit model when embedded with embed.inference=refit), folds or refit
    group_agg: none           # none, mean or max: group-level AUC/EER/AP next to sample level (video_auc)
    stage1:
      run: runs/demo/stage1   # MobileNetV4 filter run dir (best_model.pth, val_predictions.csv)
      thresholds: ""          # a thresholds.json to use instead of fitting on val_predictions.csv
    experts: []               # [] = the experts recorded in the stack's meta_features.json; or a list of
                              #   {name, oof, runs, alignment}: oof_embeddings.parquet, fold run dirs
                              #   (default: those saved in the alignment), alignment .npz (default: next to oof)
    stack:
      dir: runs/demo/stack    # meta_model.json (+ .txt) + meta_features.json + meta_predictions.parquet
      rule: youden            # which OOF-fit threshold decides stage 3: youden, f1 or max_specificity_at_recall
      thresholds: ""          # a thresholds.json to use instead of fitting on the stack's OOF rows
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from distrib.config import ConfigError, read_yaml_mapping
from distrib.config.fields import Section, check_choice, check_value, closest_key, field_docs

RULES = ("youden", "f1", "max_specificity_at_recall")


@dataclass
class Stage1Config(Section):
    _prefix = "stage1"
    run: str = field(default="", metadata={"doc": "stage-1 (filter) run directory"})
    thresholds: str = field(
        default="",
        metadata={"doc": "optional thresholds.json holding the band; '' = fit on the run's val_predictions.csv"},
    )

    def validate(self) -> None:
        check_value(bool(self.run), "stage1.run", self.run, "the stage-1 run directory")


@dataclass
class ExpertConfig(Section):
    _prefix = "experts[]"
    name: str = field(
        default="", metadata={"doc": "expert name as in meta_features.json (e.g. tf_efficientnetv2_b3, genconvit_ed)"}
    )
    oof: str = field(
        default="",
        metadata={"doc": "the expert's oof_embeddings.parquet (its OOF probabilities fit the expert's own threshold)"},
    )
    runs: list[str] = field(
        default_factory=list, metadata={"doc": "fold run dirs; [] = those recorded in the alignment file"}
    )
    alignment: str = field(default="", metadata={"doc": "saved alignment .npz; '' = <oof stem>_alignment.npz"})

    def validate(self) -> None:
        check_value(bool(self.name), "experts[].name", self.name, "the expert's name in meta_features.json")
        check_value(bool(self.oof), "experts[].oof", self.oof, "the expert's oof_embeddings.parquet")


@dataclass
class MetaStageConfig(Section):
    _prefix = "stack"
    dir: str = field(
        default="",
        metadata={"doc": "stack output dir (meta_model.json/.txt, meta_features.json, meta_predictions.parquet)"},
    )
    rule: str = field(
        default="youden", metadata={"doc": "threshold rule deciding stage 3, fit on the meta-model's OOF predictions"}
    )
    thresholds: str = field(
        default="",
        metadata={"doc": "optional thresholds.json; '' = fit on dir/meta_predictions.parquet (split == 'oof')"},
    )

    def validate(self) -> None:
        check_value(bool(self.dir), "stack.dir", self.dir, "the stack output directory")
        check_choice("stack.rule", self.rule, RULES)


@dataclass
class CascadeConfig(Section):
    name: str = field(default="cascade", metadata={"doc": "report title"})
    shards: str = field(default="", metadata={"doc": "shard dir/URL; '' = the stage-1 run's data.shards"})
    batch_size: int = field(default=64, metadata={"doc": "streamed batch size"})
    num_workers: int = field(default=0, metadata={"doc": "loader workers"})
    device: str = field(default="auto", metadata={"doc": "auto, cpu or cuda"})
    recall: float = field(default=0.99, metadata={"doc": "stage-1 band recall constraint on auto-decided samples"})
    specificity: float = field(
        default=0.95, metadata={"doc": "stage-1 band specificity constraint on auto-decided samples"}
    )
    evaluate_all_stages: bool = field(
        default=True, metadata={"doc": "run stages 2+3 on every sample too (per-stage metrics, full cost)"}
    )
    expert_models: str = field(
        default="auto",
        metadata={"doc": "auto (refit if embedded with embed.inference=refit), folds (K models) or refit (1)"},
    )
    bootstrap: int = field(default=200, metadata={"doc": "grouped bootstrap resamples for threshold CIs"})
    group_agg: str = field(
        default="none",
        metadata={"doc": "also report AUC/EER/AP per group (video, item) from its samples' scores: none, mean, max"},
    )
    stage1: Stage1Config = field(default_factory=Stage1Config)
    experts: list = field(
        default_factory=list,
        metadata={"doc": "the experts (keys under experts[]); [] = those the stack's meta_features.json records"},
    )
    stack: MetaStageConfig = field(default_factory=MetaStageConfig)

    def validate(self) -> None:
        check_value(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_value(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("expert_models", self.expert_models, ("auto", "folds", "refit"))
        check_choice("group_agg", self.group_agg, ("none", "mean", "max"))
        check_value(0 < self.recall <= 1, "recall", self.recall, "0 < R <= 1")
        check_value(0 < self.specificity <= 1, "specificity", self.specificity, "0 < S <= 1")
        check_value(self.bootstrap >= 0, "bootstrap", self.bootstrap, ">= 0")


def _section(cls, data, key: str, base: Path):
    if not isinstance(data, dict):
        raise ConfigError(
            f"cascade key '{key}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown cascade key '{key}.{k}'{closest_key(k, names, field_docs(cls))}")
    obj = cls(**data)
    for f in dataclasses.fields(obj):  # resolve paths relative to the YAML's folder
        v = getattr(obj, f.name)
        if f.name in ("run", "thresholds", "oof", "alignment", "dir") and v:
            setattr(obj, f.name, _resolve(v, base))
        elif f.name == "runs":
            setattr(obj, f.name, [_resolve(p, base) for p in v])
    return obj


def _resolve(p: str, base: Path) -> str:
    return p if "://" in p or p.startswith("pipe:") or Path(p).is_absolute() else str((base / p).resolve())


def load_cascade_config(path: str | Path) -> CascadeConfig:
    """Read and validate a cascade YAML (see the module docstring for the format)."""
    path = Path(path)
    data = read_yaml_mapping(
        path,
        "cascade config",
        " (see launch/configs/cascades/deepfake.yaml)",
        "a mapping (see launch/configs/cascades/deepfake.yaml)",
    )
    names = [f.name for f in dataclasses.fields(CascadeConfig)]
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown cascade key '{k}' in {path}{closest_key(k, names, field_docs(CascadeConfig))}")
    base = path.parent
    kw = {k: v for k, v in data.items() if k not in ("stage1", "experts", "stack")}
    if kw.get("shards"):
        kw["shards"] = _resolve(kw["shards"], base)
    experts = data.get("experts") or []
    if not isinstance(experts, list):
        raise ConfigError(f"cascade key 'experts' in {path} must be a list of {{name, oof, runs, alignment}}")
    try:
        return CascadeConfig(
            **kw,
            stage1=_section(Stage1Config, data.get("stage1", {}), "stage1", base),
            stack=_section(MetaStageConfig, data.get("stack", {}), "stack", base),
            experts=[_section(ExpertConfig, e, f"experts[{i}]", base) for i, e in enumerate(experts)],
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
