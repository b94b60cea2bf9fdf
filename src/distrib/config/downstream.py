"""Config sections of the stages after training: OOF embeddings, the meta-model, thresholds, export."""

from __future__ import annotations

from dataclasses import dataclass, field

from distrib.config.fields import Section, check_choice, check_value


@dataclass
class EmbedConfig(Section):
    _prefix = "embed"
    dim: int = 256  # projected embedding size (PCA fit on the fold model's own training folds)
    anchors: int = 256  # shared unlabeled anchor samples used for Procrustes alignment across folds
    fit_samples: int = 2048  # training-fold samples used to fit each fold's PCA
    batch_size: int = 64  # extraction batch size
    inference: str = "folds"  # experts at inference: folds (K fold models) or refit (+1 model on all folds, aligned)

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
        default_factory=lambda: ["prob", "emb", "recon"]
    )  # feature sets: prob, emb, recon, stage1
    meta: str = "auto"  # meta-learner: auto (best mean meta-CV AUC), lightgbm, logistic, weighted, best_expert
    tie: float = 0.001  # auto: a candidate within this mean CV AUC of the best wins if it is simpler
    folds: int = 5  # group K-fold CV of the meta-model on the OOF table
    inner_folds: int = 4  # inner grouped folds (logistic C search, LightGBM early stopping)
    n_estimators: int = 400  # maximum boosting rounds
    learning_rate: float = 0.05  # LightGBM learning rate
    num_leaves: int = 7  # LightGBM leaves per tree (few: a small table over-fits)
    min_child_samples: int = 20  # LightGBM minimum samples per leaf
    feature_fraction: float = 0.8  # LightGBM fraction of columns per tree
    lambda_l2: float = 1.0  # LightGBM L2 penalty on leaf values
    monotone: bool = True  # LightGBM: monotone-increasing in every probability column
    early_stopping_rounds: int = 30  # early stopping on the inner folds
    logistic_cs: int = 10  # logistic: number of C values (log grid) searched by inner grouped CV
    ensemble_size: int = 25  # weighted: greedy selection rounds (Caruana, with replacement)
    bootstrap: int = 1000  # grouped bootstrap resamples for the CI of AUC(meta) - AUC(best expert) on val/test
    n_jobs: int = 2  # LightGBM threads
    seed: int = 0  # meta-model, fold and bootstrap seed
    group_agg: str = "none"  # also score the ablation/candidates/splits per group (video, item): none, mean, max

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
    recall: float = 0.99  # hard recall constraint R (pit plan default 0.99)
    specificity: float = 0.95  # specificity constraint S for the 3-way band
    bootstrap: int = 1000  # grouped bootstrap resamples for confidence intervals
    seed: int = 0  # bootstrap seed
    fit_split: str = "oof"  # rows thresholds are fit on: oof, val or oof+val (never test)
    group_agg: str = "none"  # fit on group scores (each group's mean or max prob) instead of samples: none, mean, max

    def validate(self) -> None:
        check_choice("thresholds.group_agg", self.group_agg, ("none", "mean", "max"))
        check_choice("thresholds.fit_split", self.fit_split, ("oof", "val", "oof+val"))
        check_value(0 < self.recall <= 1, "thresholds.recall", self.recall, "0 < R <= 1")
        check_value(0 < self.specificity <= 1, "thresholds.specificity", self.specificity, "0 < S <= 1")
        check_value(self.bootstrap >= 0, "thresholds.bootstrap", self.bootstrap, ">= 0")


@dataclass
class ExportConfig(Section):
    _prefix = "export"
    max_latency_ms: float = 16.0  # deployment target: ONNX Runtime CPU median latency at batch 1 (pit plan)
    max_size_mb: float = 100.0  # deployment target: exported file size in MiB (pit plan)
    max_prob_diff: float = 1.0e-4  # fp32 export must match PyTorch's probabilities to this (max abs)
    validate_samples: int = 512  # real val images compared between PyTorch and the export
    latency_repeats: int = 50  # timed batch-1 runs (after 5 warm-up runs)
    exporter: str = "dynamo"  # torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript tracing)
    opset: int = 18  # ONNX opset

    def validate(self) -> None:
        check_value(self.max_latency_ms > 0, "export.max_latency_ms", self.max_latency_ms, "> 0")
        check_value(self.max_size_mb > 0, "export.max_size_mb", self.max_size_mb, "> 0")
        check_value(self.max_prob_diff > 0, "export.max_prob_diff", self.max_prob_diff, "> 0")
        check_value(self.validate_samples >= 2, "export.validate_samples", self.validate_samples, ">= 2")
        check_value(self.latency_repeats >= 1, "export.latency_repeats", self.latency_repeats, ">= 1")
        check_choice("export.exporter", self.exporter, ("dynamo", "legacy"))
        check_value(13 <= self.opset <= 21, "export.opset", self.opset, "13..21")
