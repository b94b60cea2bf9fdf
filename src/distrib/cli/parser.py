"""The one argument parser of ``distrib``: a table of subcommand -> ``commands.cmd_*``."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable

from distrib import __version__
from distrib.cli.commands import (
    DEMO_RECIPE,
    cmd_bench,
    cmd_cascade,
    cmd_data,
    cmd_demo,
    cmd_embed,
    cmd_export,
    cmd_predict,
    cmd_run,
    cmd_shard,
    cmd_shard_inspect,
    cmd_stack,
    cmd_thresholds,
    cmd_train,
    cmd_tune,
    cmd_weights_import,
)
from distrib.config import schema
from distrib.config.docs import keys_help

REFERENCE = "every key with its type, allowed values and --resume rule: docs/reference/config.md"
TRAIN_KEYS = [("", schema.ExperimentConfig)] + [
    (k, schema.SECTIONS[k]) for k in ("data", "augment", "model", "optim", "train", "dist", "eval")
]
RECIPE_NOTE = (
    "stack.KEY and thresholds.KEY as in `distrib stack --help` and `distrib thresholds --help`; an experiment "
    "key (train.epochs=1, data.img_size=32: `distrib train --help`) is added to every experiment's overrides."
)


def _recipe_keys() -> list[tuple[str, type]]:
    from distrib.recipes import config as recipe  # the recipes package imports sklearn: only for --help

    return [("", recipe.Recipe)] + [(k, recipe.SECTIONS[k]) for k in ("data", "stage1", "cascade", "shootout")]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose config-keys epilog is built when help is printed, so commands start fast."""

    keys: Callable[[], list[tuple[str, type]]] | None = None
    keys_note = ""

    def format_help(self) -> str:
        if self.keys is not None:
            self.formatter_class = argparse.RawDescriptionHelpFormatter
            self.epilog = f"config keys, KEY=DEFAULT ({REFERENCE}):\n{keys_help(self.keys())}"
            self.epilog += f"\n\n{textwrap.fill(self.keys_note, 100)}" if self.keys_note else ""
        return super().format_help()


def _add_overrides(
    p: argparse.ArgumentParser,
    example: str = "optim.lr=3e-4 data.fold=2",
    keys: list[tuple[str, type]] | Callable[[], list[tuple[str, type]]] | None = None,
    note: str = "",
) -> None:
    """The ``KEY=VALUE`` words; with ``keys`` (section, dataclass) the help lists those keys with their
    defaults and docs, read from the dataclasses' field metadata like docs/reference/config.md."""
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    if keys is not None:
        p.keys = keys if callable(keys) else lambda: keys
        p.keys_note = note


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="distrib",
        description="Distributed image-classifier training for cascades "
        "of vision models: shards, training, Ray sweeps, stacking, cascades, inference.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build the bundled demo dataset")
    p.add_argument("what", choices=["demo"], help="dataset to build")
    p.add_argument("--out", required=True, help="output directory (images + manifests)")
    p.add_argument(
        "--images", default=None, help="folder of your own photos to tile instead of/in addition to the bundled ones"
    )
    p.add_argument("--size", default="full", choices=["tiny", "small", "full"], help="dataset size preset")
    p.add_argument("--tile", type=int, default=64, help="tile size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "shard", help="write group-aware K-fold WebDataset shards ('distrib shard inspect DIR' verifies them)"
    )
    p.add_argument("--train", required=True, help="train manifest CSV (path,label[,group])")
    p.add_argument("--val", default=None, help="val manifest CSV")
    p.add_argument("--test", default=None, help="test manifest CSV")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-bytes", type=int, default=256 * 1024 * 1024, help="max bytes per shard")
    p.add_argument("--workers", type=int, default=2, help="writer processes")
    p.add_argument("--overwrite", action="store_true", help="rewrite a complete output directory")
    p.add_argument(
        "--positive",
        default=None,
        help="class name that becomes label 1 (case-insensitive); needed for names other than real/fake",
    )
    p.add_argument(
        "--names",
        default=None,
        help="names for labels 0/1 in the index and every report, e.g. negative=clean,positive=pit "
        "(integer labels are otherwise 'negative'/'positive')",
    )
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("shard-inspect", help="verify a shard directory's checksums and counts")
    p.add_argument("dir", help="shard directory or URL holding index.json")
    p.set_defaults(func=cmd_shard_inspect)

    p = sub.add_parser("train", help="train one model (single process; use accelerate launch for several)")
    p.add_argument("config", help="experiment YAML (launch/configs/experiments/*.yaml)")
    _add_overrides(
        p,
        keys=TRAIN_KEYS,
        note="tune, embed, stack, thresholds and export keys: `distrib tune|embed|stack|thresholds|export --help`.",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="resume from the run directory's last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep: folds x hyper-parameter grid")
    p.add_argument("config", help="experiment YAML (launch/configs/experiments/*.yaml)")
    _add_overrides(p, keys=[("tune", schema.TuneConfig)], note="and every key `distrib train --help` lists.")
    p.add_argument("--grid", default=None, help="YAML of dotted key -> list of values (launch/configs/grids/)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--address", default=None, help="existing Ray cluster address (default: start a local one)")
    p.add_argument("--storage", default=None, help="shared storage path for multi-node sweeps")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray cluster")
    p.add_argument("--resume", action="store_true", help="continue a killed sweep (Tuner.restore)")
    p.add_argument(
        "--search",
        choices=("grid", "random", "optuna"),
        default=None,
        help="tune.search: grid (every config x fold) or sample configs, each running all folds",
    )
    p.add_argument("--num-samples", type=int, default=None, help="tune.num_samples: configs to sample")
    p.add_argument(
        "--scheduler",
        choices=("none", "asha"),
        default=None,
        help="tune.scheduler: asha stops whole sampled configs after a fold (random|optuna only)",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("embed", help="extract aligned out-of-fold embeddings from fold runs")
    p.add_argument("--sweep", default=None, help="sweep directory (uses its best config's fold runs)")
    p.add_argument("--runs", nargs="*", default=None, help="fold run directories, one per fold")
    p.add_argument("--out", required=True, help="output parquet (oof_embeddings.parquet)")
    _add_overrides(p, "embed.dim=256", [("embed", schema.EmbedConfig)])
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("stack", help="meta-learner (auto: best of weighted/logistic/LightGBM by grouped CV)")
    p.add_argument("--oof", nargs="+", required=True, help="oof_embeddings.parquet files, one per expert")
    p.add_argument(
        "--stage1",
        nargs="+",
        default=None,
        help="key,prob CSV/parquet of stage-1 probabilities (out-of-fold on training rows, e.g. the "
        "stage-1 fold runs' val_predictions.csv; plus val/test rows) for stack.features=[...,stage1]",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="experiment YAML for the stack section")
    _add_overrides(p, "stack.features=[prob]", [("stack", schema.StackConfig)])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("thresholds", help="fit decision thresholds on OOF/val predictions (never test)")
    p.add_argument("--pred", required=True, help="predictions file (csv/parquet with label, prob[, group, split])")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    _add_overrides(p, "thresholds.recall=0.99", [("thresholds", schema.ThresholdConfig)])
    p.set_defaults(func=cmd_thresholds)

    p = sub.add_parser("cascade", help="run the 3-stage cascade on a split")
    p.add_argument("--config", required=True, help="cascade YAML (launch/configs/cascades/)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", default=None, help="output directory (default: next to the cascade YAML)")
    p.set_defaults(func=cmd_cascade)

    p = sub.add_parser("predict", help="apply a run or a cascade to a folder / CSV list / shard dir -> CSV")
    p.add_argument("--model", required=True, help="run directory (best_model.pth) or cascade YAML")
    p.add_argument(
        "--images",
        required=True,
        help="image folder (recursive), CSV with a 'path' column (optional group, label), or shard directory",
    )
    p.add_argument(
        "--out", required=True, help="predictions CSV (<stem>_skipped.csv, _summary.json and _groups.csv go beside it)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0: 64, or the cascade's batch_size)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--split", default=None, help="shard input only: val, test, train or all (default all)")
    p.add_argument("--thresholds", default=None, help="run only: a thresholds.json (default RUN_DIR/thresholds.json)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a run's best model to ONNX/TorchScript, validate, time; last line JSON")
    p.add_argument("run", help="run directory (best_model.pth + config.yaml)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--int8", action="store_true", help="also write an ONNX Runtime int8-quantized model")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model.onnx or model.torchscript.pt)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")
    _add_overrides(p, "export.max_latency_ms=16 export.max_size_mb=100", [("export", schema.ExportConfig)])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "demo", help="the main job: data -> shards -> stage 1 -> sweep -> OOF -> stack -> cascade -> report"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"], help="tiny is the test setting")
    p.add_argument(
        "--configs",
        default=None,
        help="folder holding experiments/demo_*.yaml and grids/demo.yaml to use instead of the recipe's",
    )
    p.add_argument("--recipe", default=None, help=f"the demo recipe (default: {DEMO_RECIPE})")
    _add_overrides(p, "train.epochs=2 stack.n_estimators=100", _recipe_keys, RECIPE_NOTE)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "run", help="run a recipe: shard -> train -> tune + embed -> stack -> thresholds -> cascade -> report"
    )
    p.add_argument("recipe", help="recipe YAML (launch/recipes/*.yaml)")
    p.add_argument("--out", required=True, help="output directory; re-run the same command to continue a killed run")
    p.add_argument(
        "--overwrite", action="store_true", help="clear the outputs of a different recipe in --out and start over"
    )
    p.add_argument("--address", default=None, help="existing Ray cluster address for the sweeps (default: a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray cluster")
    _add_overrides(p, "data.folds=3 train.epochs=2 stack.n_estimators=100", _recipe_keys, RECIPE_NOTE)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("weights", help="pretrained weights for offline machines")
    wsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = wsub.add_parser(
        "import", help="map a state dict in any key layout onto a timm model -> safetensors (model.pretrained_file)"
    )
    q.add_argument("src", help="state-dict file, or pkg:PACKAGE (an installed package that ships one)")
    q.add_argument("--model", required=True, help="timm model name, e.g. tf_efficientnet_lite0")
    q.add_argument("--out", required=True, help="output .safetensors (a .json record of the mapping is written beside)")
    q.set_defaults(func=cmd_weights_import)

    p = sub.add_parser("bench", help="benchmarks; the last line printed is one JSON object")
    p.add_argument("name", choices=["loader", "trainer", "latency", "sweep", "cascade"])
    p.add_argument("--shards", default=None, help="shard directory (loader, cascade)")
    p.add_argument("--config", default=None, help="experiment YAML (trainer, sweep)")
    p.add_argument("--out", default=None, help="scratch/output directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument(
        "--vs",
        choices=["bare", "timm"],
        default="bare",
        help="trainer: also time timm's own training step (timm.utils scaler/clipping) on the same batches",
    )
    _add_overrides(p, "repeats=5 threads=1")
    p.set_defaults(func=cmd_bench)
    return parser
