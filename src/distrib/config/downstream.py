"""Config sections of the stages after training: OOF embeddings, the meta-model, thresholds, export."""

from __future__ import annotations

from dataclasses import dataclass, field

from distrib.config.fields import Section, check_choice, check_value


@dataclass
class EmbedConfig(Section):
    _prefix = "embed"
    dim: int = field(
        default=256, metadata={"doc": "projected embedding size (PCA fit on the fold model's own training folds)"}
    )
    anchors: int = field(
        default=256, metadata={"doc": "shared unlabeled anchor samples used for Procrustes alignment across folds"}
    )
    fit_samples: int = field(default=2048, metadata={"doc": "training-fold samples used to fit each fold's PCA"})
    batch_size: int = field(default=64, metadata={"doc": "extraction batch size"})
    inference: str = field(
        default="folds",
        metadata={"doc": "experts at inference: folds (K fold models) or refit (+1 model on all folds, aligned)"},
    )

    def validate(self) -> None:
        check_choice("embed.inference", self.inference, ("folds", "refit"))
        check_value(self.dim >= 2, "embed.dim", self.dim, ">= 2")
        check_value(self.anchors >= 2, "embed.anchors", self.anchors, ">= 2")
        check_value(self.fit_samples >= 2, "embed.fit_samples", self.fit_samples, ">= 2")
        check_value(self.batch_size >= 1, "embed.batch_size", self.batch_size, ">= 1")


@dataclass
class StackConfig(Section):
    _prefix = "stack"
    features: list[str] = field(
        default_factory=lambda: ["prob", "emb", "recon"], metadata={"doc": "feature sets: prob, emb, recon, stage1"}
    )
    meta: str = field(
        default="auto",
        metadata={"doc": "meta-learner: auto (best mean meta-CV AUC), lightgbm, logistic, weighted, best_expert"},
    )
    tie: float = field(
        default=0.001, metadata={"doc": "auto: a candidate within this mean CV AUC of the best wins if it is simpler"}
    )
    folds: int = field(default=5, metadata={"doc": "group K-fold CV of the meta-model on the OOF table"})
    inner_folds: int = field(
        default=4, metadata={"doc": "inner grouped folds (logistic C search, LightGBM early stopping)"}
    )
    n_estimators: int = field(default=400, metadata={"doc": "maximum boosting rounds"})
    learning_rate: float = field(default=0.05, metadata={"doc": "LightGBM learning rate"})
    num_leaves: int = field(default=7, metadata={"doc": "LightGBM leaves per tree (few: a small table over-fits)"})
    min_child_samples: int = field(default=20, metadata={"doc": "LightGBM minimum samples per leaf"})
    feature_fraction: float = field(default=0.8, metadata={"doc": "LightGBM fraction of columns per tree"})
    lambda_l2: float = field(default=1.0, metadata={"doc": "LightGBM L2 penalty on leaf values"})
    monotone: bool = field(default=True, metadata={"doc": "LightGBM: monotone-increasing in every probability column"})
    early_stopping_rounds: int = field(default=30, metadata={"doc": "early stopping on the inner folds"})
    logistic_cs: int = field(
        default=10, metadata={"doc": "logistic: number of C values (log grid) searched by inner grouped CV"}
    )
    ensemble_size: int = field(
        default=25, metadata={"doc": "weighted: greedy selection rounds (Caruana, with replacement)"}
    )
    bootstrap: int = field(
        default=1000,
        metadata={"doc": "grouped bootstrap resamples for the CI of AUC(meta) - AUC(best expert) on val/test"},
    )
    n_jobs: int = field(default=2, metadata={"doc": "LightGBM threads"})
    seed: int = field(default=0, metadata={"doc": "meta-model, fold and bootstrap seed"})
    group_agg: str = field(
        default="none",
        metadata={"doc": "also score the ablation/candidates/splits per group (video, item): none, mean, max"},
    )

    def validate(self) -> None:
        check_choice("stack.group_agg", self.group_agg, ("none", "mean", "max"))
        for f in self.features:
            check_choice("stack.features", f, ("prob", "emb", "recon", "stage1"))
        check_choice("stack.meta", self.meta, ("auto", "lightgbm", "logistic", "weighted", "best_expert"))
        check_value(0 <= self.tie < 0.5, "stack.tie", self.tie, "0 <= tie < 0.5")
        check_value(self.folds >= 2, "stack.folds", self.folds, ">= 2")
        check_value(self.inner_folds >= 2, "stack.inner_folds", self.inner_folds, ">= 2")
        check_value(self.n_estimators >= 1, "stack.n_estimators", self.n_estimators, ">= 1")
        check_value(0 < self.learning_rate <= 1, "stack.learning_rate", self.learning_rate, "0 < lr <= 1")
        check_value(self.num_leaves >= 2, "stack.num_leaves", self.num_leaves, ">= 2")
        check_value(0 < self.feature_fraction <= 1, "stack.feature_fraction", self.feature_fraction, "0 < f <= 1")
        check_value(self.lambda_l2 >= 0, "stack.lambda_l2", self.lambda_l2, ">= 0")
        check_value(self.early_stopping_rounds >= 0, "stack.early_stopping_rounds", self.early_stopping_rounds, ">= 0")
        check_value(self.logistic_cs >= 1, "stack.logistic_cs", self.logistic_cs, ">= 1")
        check_value(self.ensemble_size >= 1, "stack.ensemble_size", self.ensemble_size, ">= 1")
        check_value(self.bootstrap >= 0, "stack.bootstrap", self.bootstrap, ">= 0")


@dataclass
class ThresholdConfig(Section):
    _prefix = "thresholds"
    recall: float = field(default=0.99, metadata={"doc": "hard recall constraint R (pit plan default 0.99)"})
    specificity: float = field(default=0.95, metadata={"doc": "specificity constraint S for the 3-way band"})
    bootstrap: int = field(default=1000, metadata={"doc": "grouped bootstrap resamples for confidence intervals"})
    seed: int = field(default=0, metadata={"doc": "bootstrap seed"})
    fit_split: str = field(
        default="oof", metadata={"doc": "rows thresholds are fit on: oof, val or oof+val (never test)"}
    )
    group_agg: str = field(
        default="none",
        metadata={"doc": "fit on group scores (each group's mean or max prob) instead of samples: none, mean, max"},
    )

    def validate(self) -> None:
        check_choice("thresholds.group_agg", self.group_agg, ("none", "mean", "max"))
        check_choice("thresholds.fit_split", self.fit_split, ("oof", "val", "oof+val"))
        check_value(0 < self.recall <= 1, "thresholds.recall", self.recall, "0 < R <= 1")
        check_value(0 < self.specificity <= 1, "thresholds.specificity", self.specificity, "0 < S <= 1")
        check_value(self.bootstrap >= 0, "thresholds.bootstrap", self.bootstrap, ">= 0")


@dataclass
class ExportConfig(Section):
    _prefix = "export"
    max_latency_ms: float = field(
        default=16.0, metadata={"doc": "deployment target: ONNX Runtime CPU median latency at batch 1 (pit plan)"}
    )
    max_size_mb: float = field(
        default=100.0, metadata={"doc": "deployment target: exported file size in MiB (pit plan)"}
    )
    max_prob_diff: float = field(
        default=1.0e-4, metadata={"doc": "fp32 export must match PyTorch's probabilities to this (max abs)"}
    )
    validate_samples: int = field(
        default=512, metadata={"doc": "real val images compared between PyTorch and the export"}
    )
    latency_repeats: int = field(default=50, metadata={"doc": "timed batch-1 runs (after 5 warm-up runs)"})
    exporter: str = field(
        default="dynamo", metadata={"doc": "torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript tracing)"}
    )
    opset: int = field(default=18, metadata={"doc": "ONNX opset"})

    def validate(self) -> None:
        check_value(self.max_latency_ms > 0, "export.max_latency_ms", self.max_latency_ms, "> 0")
        check_value(self.max_size_mb > 0, "export.max_size_mb", self.max_size_mb, "> 0")
        check_value(self.max_prob_diff > 0, "export.max_prob_diff", self.max_prob_diff, "> 0")
        check_value(self.validate_samples >= 2, "export.validate_samples", self.validate_samples, ">= 2")
        check_value(self.latency_repeats >= 1, "export.latency_repeats", self.latency_repeats, ">= 1")
        check_choice("export.exporter", self.exporter, ("dynamo", "legacy"))
        check_value(13 <= self.opset <= 21, "export.opset", self.opset, "13..21")
