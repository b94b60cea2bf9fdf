"""The ``distrib`` console script: thin argument parsing over the library's functions.

    distrib data demo --out data/demo
    distrib shard --train train_manifest.csv --val val_manifest.csv --out shards/ --folds 5
    distrib train launch/configs/debug.yaml --out runs/debug data.shards=shards/
    distrib tune launch/configs/debug.yaml --grid launch/configs/grid_debug.yaml --out runs/sweep
    distrib bench loader --shards shards/

Each subcommand imports its module lazily so ``distrib --help`` stays fast.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Callable

from distrib.errors import DistribError


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", help="experiment YAML (launch/configs/*.yaml)")
    else:
        p.add_argument("--config", default=None, help="experiment YAML (launch/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.fold=2")


def _cmd_data(a: argparse.Namespace) -> dict:
    from distrib.demo_data import build_demo_dataset
    return build_demo_dataset(a.out, images=a.images, size=a.size, tile=a.tile, seed=a.seed,
                              overwrite=a.overwrite)


def _cmd_shard(a: argparse.Namespace) -> dict:
    from distrib.shards import write_shards
    return write_shards(a.train, a.out, val=a.val, test=a.test, folds=a.folds, seed=a.seed,
                        shard_size=a.shard_size, shard_bytes=a.shard_bytes, workers=a.workers,
                        overwrite=a.overwrite)


def _cmd_shard_inspect(a: argparse.Namespace) -> dict:
    from distrib.shards import inspect_shards
    return inspect_shards(a.dir)


def _cmd_train(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.train import run
    cfg = load_config(a.config, a.overrides)
    return run(cfg, a.out, resume=a.resume)


def _cmd_tune(a: argparse.Namespace) -> dict:
    from distrib.tune import run_sweep_cli
    return run_sweep_cli(a)


def _cmd_embed(a: argparse.Namespace) -> dict:
    from distrib.embed import embed_cli
    return embed_cli(a)


def _cmd_stack(a: argparse.Namespace) -> dict:
    from distrib.stack import stack_cli
    return stack_cli(a)


def _cmd_thresholds(a: argparse.Namespace) -> dict:
    from distrib.thresholds import thresholds_cli
    return thresholds_cli(a)


def _cmd_cascade(a: argparse.Namespace) -> dict:
    from distrib.cascade import cascade_cli
    return cascade_cli(a)


def _cmd_demo(a: argparse.Namespace) -> dict:
    from distrib.pipeline import run_demo
    return run_demo(a.out, size=a.size, overrides=a.overrides, configs=a.configs)


def _cmd_bench(a: argparse.Namespace) -> dict:
    from distrib.bench import run_bench
    return run_bench(a.name, a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build the bundled demo dataset")
    p.add_argument("what", choices=["demo"], help="dataset to build")
    p.add_argument("--out", required=True, help="output directory (images + manifests)")
    p.add_argument("--images", default=None, help="folder of your own photos to tile instead of/in addition to the bundled ones")
    p.add_argument("--size", default="full", choices=["tiny", "small", "full"], help="dataset size preset")
    p.add_argument("--tile", type=int, default=64, help="tile size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("shard", help="write group-aware K-fold WebDataset shards ('distrib shard inspect DIR' verifies them)")
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
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("shard-inspect", help="verify a shard directory's checksums and counts")
    p.add_argument("dir", help="shard directory or URL holding index.json")
    p.set_defaults(func=_cmd_shard_inspect)

    p = sub.add_parser("train", help="train one model (single process; use accelerate launch for several)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="resume from the run directory's last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep: folds x hyper-parameter grid")
    _add_config_args(p)
    p.add_argument("--grid", default=None, help="YAML of dotted key -> list of values")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--address", default=None, help="existing Ray cluster address (default: start a local one)")
    p.add_argument("--storage", default=None, help="shared storage path for multi-node sweeps")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray cluster")
    p.add_argument("--resume", action="store_true", help="continue a killed sweep (Tuner.restore)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("embed", help="extract aligned out-of-fold embeddings from fold runs")
    p.add_argument("--sweep", default=None, help="sweep directory (uses its best config's fold runs)")
    p.add_argument("--runs", nargs="*", default=None, help="fold run directories, one per fold")
    p.add_argument("--out", required=True, help="output parquet (oof_embeddings.parquet)")
    p.add_argument("overrides", nargs="*", help="dotted overrides (embed.dim=256 ...)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("stack", help="LightGBM meta-learner on OOF embeddings")
    p.add_argument("--oof", nargs="+", required=True, help="oof_embeddings.parquet files, one per expert")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="experiment YAML for the stack section")
    p.add_argument("overrides", nargs="*", help="dotted overrides (stack.features=[prob] ...)")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("thresholds", help="fit decision thresholds on OOF/val predictions (never test)")
    p.add_argument("--pred", required=True, help="predictions file (csv/parquet with label, prob[, group, split])")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*", help="dotted overrides (thresholds.recall=0.99 ...)")
    p.set_defaults(func=_cmd_thresholds)

    p = sub.add_parser("cascade", help="run the 3-stage cascade on a split")
    p.add_argument("--config", required=True, help="cascade YAML")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", default=None, help="output directory (default: next to the cascade YAML)")
    p.set_defaults(func=_cmd_cascade)

    p = sub.add_parser("demo", help="the main job: data -> shards -> stage 1 -> sweep -> OOF -> stack -> cascade -> report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"], help="tiny is the test setting")
    p.add_argument("--configs", default=None, help="folder holding demo_*.yaml (default: launch/configs)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks; the last line printed is one JSON object")
    p.add_argument("name", choices=["loader", "trainer", "latency", "sweep", "cascade"])
    p.add_argument("--shards", default=None, help="shard directory (loader, cascade)")
    p.add_argument("--config", default=None, help="experiment YAML (trainer, sweep)")
    p.add_argument("--out", default=None, help="scratch/output directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["shard", "inspect"]:  # 'distrib shard inspect DIR'
        argv = ["shard-inspect", *argv[2:]]
    parser = build_parser()
    # argparse cannot put positional overrides after an option ('train CFG --out D a.b=1'):
    # collect the leftover 'key=value' words into the subcommand's overrides instead of failing
    args, extra = parser.parse_known_args(argv)
    bad = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    func: Callable = args.func
    try:
        result = func(args)
    except DistribError as e:
        print(f"distrib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"distrib {args.command}: error: no space left on the device while writing "
              f"{e.filename or 'an output file'}; free space or point --out at a larger disk. Outputs are "
              "written to temp names and renamed, so no partial file was left; re-run the same command "
              "(add --resume for train/tune) to continue.", file=sys.stderr)
        return 2
    if isinstance(result, dict) and args.command not in ("bench",):
        print(json.dumps(result, default=str))
    return 0
