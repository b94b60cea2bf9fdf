"""The ``distrib`` console script: the one argument parser, a table of subcommand -> library function.

    distrib data demo --out data/demo
    distrib shard --train train_manifest.csv --val val_manifest.csv --out shards/ --folds 5
    distrib train launch/configs/experiments/debug.yaml --out runs/debug data.shards=shards/
    distrib tune launch/configs/experiments/debug.yaml --grid launch/configs/grids/debug.yaml --out runs/sweep
    distrib bench loader --shards shards/

Library functions take plain values and return dicts; everything printed, and every exit code, is
decided here. Each command imports its stage lazily so ``distrib --help`` stays fast.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable

from distrib.errors import DistribError

DEMO_EXPERIMENTS = ("demo_stage1.yaml", "demo_expert_effnetv2.yaml", "demo_expert_genconvit.yaml")
DEMO_GRID = "demo.yaml"


def _cmd_data(a: argparse.Namespace) -> dict:
    from distrib.demo.data import build_demo_dataset
    return build_demo_dataset(a.out, images=a.images, size=a.size, tile=a.tile, seed=a.seed, overwrite=a.overwrite)


def _cmd_shard(a: argparse.Namespace) -> dict:
    from distrib.data.shards import write_shards
    return write_shards(a.train, a.out, val=a.val, test=a.test, folds=a.folds, seed=a.seed,
                        shard_size=a.shard_size, shard_bytes=a.shard_bytes, workers=a.workers,
                        overwrite=a.overwrite, positive=a.positive)


def _cmd_shard_inspect(a: argparse.Namespace) -> dict:
    from distrib.data.shards import format_inspection, inspect_shards
    summary = inspect_shards(a.dir, strict=False)
    print(format_inspection(summary))
    if summary["problems"]:
        raise DistribError(f"{summary['location']}: {len(summary['problems'])} shard problem(s), first: "
                           f"{summary['problems'][0]}; re-run 'distrib shard ... --overwrite' to rewrite the shards")
    return summary


def _cmd_train(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    cfg = load_config(a.config, a.overrides)  # validated before any heavy import or process group
    from distrib.training.dist import is_main
    from distrib.training.trainer import run
    result = run(cfg, a.out, resume=a.resume)
    return {k: v for k, v in result.items() if k != "confusion"} if is_main() else None  # one JSON line per run


def _cmd_tune(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.sweep.driver import run_sweep
    from distrib.sweep.grid import check_grid, load_grid
    cfg = load_config(a.config, a.overrides)
    grid = load_grid(a.grid) if a.grid else check_grid(cfg.tune.grid)
    return run_sweep(cfg, grid, a.out, address=a.address, storage=a.storage, resume=a.resume, num_cpus=a.num_cpus)


def _cmd_embed(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.stacking.embed import alignment_path, extract_oof
    from distrib.sweep.report import best_run_dirs
    if bool(a.sweep) == bool(a.runs):
        raise DistribError("distrib embed: pass exactly one of --sweep SWEEP_DIR or --runs RUN0 RUN1 ...")
    runs = best_run_dirs(a.sweep) if a.sweep else list(a.runs)
    cfg = load_config(Path(runs[0]) / "config.yaml", a.overrides)
    df = extract_oof(runs, a.out, cfg.embed)
    return {"out": str(a.out), "rows": len(df), "alignment": str(alignment_path(a.out)),
            "splits": df["split"].value_counts().to_dict()}


def _cmd_stack(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.stacking.stack import fit_stack
    res = fit_stack(a.oof, a.out, load_config(a.config, a.overrides).stack, stage1=a.stage1)
    for name, r in res["ablation"].items():
        print(f"stack: {name:<28} meta-CV AUC {r['auc_mean']:.4f} +- {r['auc_std']:.4f}")
    for name, r in res["candidates"].items():
        mark = " <- chosen" if name == res["meta"] else ""
        print(f"stack: meta {name:<23} meta-CV AUC {r['auc_mean']:.4f} +- {r['auc_std']:.4f} "
              f"(vs best expert {r['diff_mean']:+.4f}){mark}")
    for split in res["splits"].values():
        print(f"stack: {split['vs_best_expert']['verdict']}")
    return {"out": str(a.out), "meta": res["meta"], "cv_auc_mean": res["cv"]["auc_mean"],
            "best_expert": res["best_expert"]}


def _cmd_thresholds(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows
    cfg = load_config(a.config, a.overrides).thresholds
    result = fit_thresholds(select_fit_rows(load_predictions(a.pred), cfg.fit_split, str(a.pred)), cfg, a.out)
    print(f"thresholds: {result['single']['max_specificity_at_recall']['message']}")
    print(f"thresholds: {'' if result['band']['feasible'] else 'INFEASIBLE: '}{result['band']['message']}")
    return {"thresholds": str(Path(a.out) / "thresholds.json"), "band": result["band"]}


def _cmd_cascade(a: argparse.Namespace) -> dict:
    from distrib.cascade.run import run_cascade
    res = run_cascade(a.config, a.split, a.out)
    m, cost = res["metrics"]["cascade"], res["cost"]
    print(f"cascade: AUC {m['auc']:.4f} F1 {m['f1']:.4f} recall {m['recall']:.4f} specificity {m['specificity']:.4f}; "
          f"escalation {res['escalation_rate']:.1%}; cost {cost['cascade_mean_ms']:.2f} ms/img "
          f"(x{cost['cost_ratio_to_stage1']:.2f} stage 1); report: {res['report']}")
    return {"report": res["report"], "evaluation_results": res["evaluation_results"]}


def _cmd_predict(a: argparse.Namespace) -> dict:
    from distrib.inference.predict import predict
    res = predict(a.model, a.images, a.out, device=a.device, batch_size=a.batch_size, workers=a.workers,
                  split=a.split, thresholds=a.thresholds)
    print(f"predict: {res['n']} images ({res['skipped']} skipped -> {res['skipped_csv']}) at "
          f"{res['images_per_s']:.1f} images/s; decisions {res['decisions']}; predictions: {res['out']}")
    for name, m in res.get("metrics", {}).items():
        print(f"predict: {name} AUC {m['auc']:.4f} F1 {m['f1']:.4f} recall {m['recall']:.4f} "
              f"specificity {m['specificity']:.4f} (n={m['n']})")
    return res


def _cmd_export(a: argparse.Namespace) -> dict:
    from distrib.inference.export import export_run
    res = export_run(a.run, fmt=a.format, int8=a.int8, out=a.out, threads=a.threads, overrides=a.overrides)
    for name, r in res["artifacts"].items():
        print(f"export: {name:<5} {r['path']}: {r['size_mb']:.2f} MB, max |dprob| vs PyTorch {r['max_abs_prob_diff']:.2e}, "
              f"AUC {r['auc']:.4f} (PyTorch {res['torch']['auc']:.4f}), batch-1 latency median "
              f"{r['latency_ms']['median']:.2f} ms p95 {r['latency_ms']['p95']:.2f} ms "
              f"({r['threads']} thread(s)) -> {'PASS' if r['passed'] else 'FAIL'}")
    print(json.dumps(res, default=str), flush=True)  # the last line is one JSON object
    return res


def _cmd_demo(a: argparse.Namespace) -> dict:
    from distrib.demo.pipeline import run_demo
    root = Path(a.configs) if a.configs else Path("launch/configs")
    stage1, *experts = [root / "experiments" / name for name in DEMO_EXPERIMENTS]
    missing = [str(p) for p in (stage1, *experts, root / "grids" / DEMO_GRID) if not p.is_file()]
    if missing:
        raise DistribError(f"demo configs not found: {', '.join(missing)}; run from the repository root "
                           "or pass --configs DIR (the folder holding experiments/ and grids/)")
    res = run_demo(a.out, stage1, experts, root / "grids" / DEMO_GRID, size=a.size, overrides=a.overrides)
    print(f"\nreport: {res['report']}\nresults: {res['results']}\nTensorBoard: {res['tensorboard']}\n"
          f"predictions for the folder {res['predicted_images']}: {res['predictions']}")
    return res


def _cmd_bench(a: argparse.Namespace) -> dict:
    from distrib.bench import run_bench
    if a.steps < 1 or a.workers < 0 or a.num_processes < 1:
        raise DistribError(f"distrib bench: --steps {a.steps}, --workers {a.workers} and --num-processes "
                           f"{a.num_processes} must be >= 1, >= 0 and >= 1")
    result = run_bench(a.name, shards=a.shards, config=a.config, out=a.out, workers=a.workers, steps=a.steps,
                       num_processes=a.num_processes, overrides=a.overrides)
    print(json.dumps(result, default=float), flush=True)  # the last line is the benchmark's JSON
    return result


def _add_overrides(p: argparse.ArgumentParser, example: str = "optim.lr=3e-4 data.fold=2") -> None:
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


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
    p.add_argument("--positive", default=None, help="class name that becomes label 1 (case-insensitive); needed "
                                                    "for names other than real/fake")
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("shard-inspect", help="verify a shard directory's checksums and counts")
    p.add_argument("dir", help="shard directory or URL holding index.json")
    p.set_defaults(func=_cmd_shard_inspect)

    p = sub.add_parser("train", help="train one model (single process; use accelerate launch for several)")
    p.add_argument("config", help="experiment YAML (launch/configs/experiments/*.yaml)")
    _add_overrides(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="resume from the run directory's last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep: folds x hyper-parameter grid")
    p.add_argument("config", help="experiment YAML (launch/configs/experiments/*.yaml)")
    _add_overrides(p)
    p.add_argument("--grid", default=None, help="YAML of dotted key -> list of values (launch/configs/grids/)")
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
    _add_overrides(p, "embed.dim=256")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("stack", help="meta-learner (auto: best of weighted/logistic/LightGBM by grouped CV)")
    p.add_argument("--oof", nargs="+", required=True, help="oof_embeddings.parquet files, one per expert")
    p.add_argument("--stage1", nargs="+", default=None,
                   help="key,prob CSV/parquet of stage-1 probabilities (out-of-fold on training rows, e.g. the "
                        "stage-1 fold runs' val_predictions.csv; plus val/test rows) for stack.features=[...,stage1]")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="experiment YAML for the stack section")
    _add_overrides(p, "stack.features=[prob]")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("thresholds", help="fit decision thresholds on OOF/val predictions (never test)")
    p.add_argument("--pred", required=True, help="predictions file (csv/parquet with label, prob[, group, split])")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    _add_overrides(p, "thresholds.recall=0.99")
    p.set_defaults(func=_cmd_thresholds)

    p = sub.add_parser("cascade", help="run the 3-stage cascade on a split")
    p.add_argument("--config", required=True, help="cascade YAML (launch/configs/cascades/)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", default=None, help="output directory (default: next to the cascade YAML)")
    p.set_defaults(func=_cmd_cascade)

    p = sub.add_parser("predict", help="apply a run or a cascade to a folder / CSV list / shard dir -> CSV")
    p.add_argument("--model", required=True, help="run directory (best_model.pth) or cascade YAML")
    p.add_argument("--images", required=True, help="image folder (recursive), CSV with a 'path' column "
                                                   "(optional group, label), or shard directory")
    p.add_argument("--out", required=True, help="predictions CSV (skipped.csv is written beside it)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0: 64, or the cascade's batch_size)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--split", default=None, help="shard input only: val, test, train or all (default all)")
    p.add_argument("--thresholds", default=None, help="run only: a thresholds.json (default RUN_DIR/thresholds.json)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a run's best model to ONNX/TorchScript, validate, time; last line JSON")
    p.add_argument("run", help="run directory (best_model.pth + config.yaml)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--int8", action="store_true", help="also write an ONNX Runtime int8-quantized model")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model.onnx or model.torchscript.pt)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")
    _add_overrides(p, "export.max_latency_ms=16 export.max_size_mb=100")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="the main job: data -> shards -> stage 1 -> sweep -> OOF -> stack -> cascade -> report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"], help="tiny is the test setting")
    p.add_argument("--configs", default=None, help="folder holding experiments/demo_*.yaml and grids/ "
                                                   "(default: launch/configs)")
    _add_overrides(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks; the last line printed is one JSON object")
    p.add_argument("name", choices=["loader", "trainer", "latency", "sweep", "cascade"])
    p.add_argument("--shards", default=None, help="shard directory (loader, cascade)")
    p.add_argument("--config", default=None, help="experiment YAML (trainer, sweep)")
    p.add_argument("--out", default=None, help="scratch/output directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-processes", type=int, default=1)
    _add_overrides(p, "repeats=5 threads=1")
    p.set_defaults(func=_cmd_bench)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # argparse cannot put positional overrides after an option ('train CFG --out D a.b=1'):
    # collect the leftover 'key=value' words into the subcommand's overrides instead of failing
    args, extra = parser.parse_known_args(argv)
    bad = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["shard", "inspect"]:  # 'distrib shard inspect DIR'
        argv = ["shard-inspect", *argv[2:]]
    args = _parse(build_parser(), argv)
    log = logging.getLogger("distrib")  # the library's notes and warnings reach the user on stderr
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    func: Callable = args.func
    try:
        result = func(args)
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM in tune): where things stand, how to continue
        dist = sys.modules.get("distrib.training.dist")
        if dist is None or dist.is_main():  # one message for a multi-process run, from rank 0
            print(f"distrib {args.command}: interrupted. {_resume_hint(args)}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
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
    if isinstance(result, dict) and args.command not in ("bench", "export"):
        print(json.dumps(result, default=str))
    if args.command == "tune":
        return _sweep_exit(args, result)
    return 0


def _resume_command(a: argparse.Namespace) -> str:
    """The command that continues an interrupted train/tune: the same arguments plus --resume."""
    words = ["distrib", a.command, a.config, *a.overrides, "--out", a.out]
    for flag in ("grid", "address", "storage", "num_cpus"):
        if getattr(a, flag, None) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    return shlex.join([*words, "--resume"])


def _resume_hint(a: argparse.Namespace) -> str:
    if a.command == "train":
        from distrib.runs import find_checkpoint
        from distrib.training.checkpoint import saved_state
        ckpt = find_checkpoint(a.out)
        if ckpt is None:
            return f"No checkpoint was written yet; start again with: {_resume_command(a)}"
        state = saved_state(ckpt)
        return (f"The last checkpoint is {ckpt} (epoch {state['epoch']}, step {state['step']}); "
                f"continue with: {_resume_command(a)}")
    if a.command == "tune" and (Path(a.out) / "config.yaml").is_file():
        return f"Finished trials are kept; continue with: {_resume_command(a)}"
    return "Nothing was resumed or left half-written (outputs are written to temp names and renamed)."


def _sweep_exit(a: argparse.Namespace, result: dict) -> int:
    """0 for a finished sweep; 128+signal when it was interrupted; 1 when trials failed (see README)."""
    status = result.get("status", "done")
    if status == "interrupted":
        sig = result.get("signal") or 2
        print(f"distrib tune: interrupted (signal {sig}) with {result['done']} of {result['trials']} trials "
              f"finished; {_resume_hint(a)}", file=sys.stderr)
        return 128 + sig
    if status == "incomplete":
        best = ("the best config was chosen among the configs that finished every fold only"
                if result.get("best") else "no config finished every fold, so there is no best config")
        print(f"distrib tune: {result['trials'] - result['done']} of {result['trials']} trials failed "
              f"({len(result['errors'])} error(s); see sweep_summary.csv and the trial dirs' logs); {best}. "
              f"Fix the cause, then retry the failed trials with: {_resume_command(a)}", file=sys.stderr)
        return 1
    return 0
