"""What each ``distrib`` subcommand does: call the stage's public function with plain values, print results."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from distrib.errors import DistribError
from distrib.outputs import check_outputs
from distrib.runlock import lock_output

DEMO_RECIPE = "launch/recipes/demo.yaml"
_PREDICT_SIDECARS = (("skipped", ".csv"), ("groups", ".csv"), ("summary", ".json"))  # written beside --out


def strict_json(obj) -> str:
    """One line of strict JSON: a NaN/inf value becomes null plus ``<key>_reason`` (never a bare NaN)."""
    from distrib.atomic import json_safe

    return json.dumps(json_safe(obj), allow_nan=False)


def _writer(command: str, out, is_dir: bool = True) -> None:
    """The exclusive writer lock on ``out`` (distrib.runlock), naming this command line for a refused second writer."""
    lock_output(out, shlex.join(["distrib", *sys.argv[1:]]), is_dir=is_dir)


def cmd_data(a: argparse.Namespace) -> dict:
    from distrib.demo.data import build_demo_dataset

    return build_demo_dataset(a.out, images=a.images, size=a.size, tile=a.tile, seed=a.seed, overwrite=a.overwrite)


def cmd_shard(a: argparse.Namespace) -> dict:
    from distrib.data.shards import write_shards

    outs = check_outputs("shard", dirs={"--out": a.out}, inputs=[a.train, a.val, a.test])
    _writer("shard", a.out)
    index = write_shards(
        a.train,
        a.out,
        val=a.val,
        test=a.test,
        folds=a.folds,
        seed=a.seed,
        shard_size=a.shard_size,
        shard_bytes=a.shard_bytes,
        workers=a.workers,
        overwrite=a.overwrite,
        positive=a.positive,
        names=a.names,
    )
    outs.report()
    # the printed summary leaves out the per-shard sample offsets and the group table (they are in index.json)
    return {
        **{k: v for k, v in index.items() if k not in ("shards", "groups", "heldout_groups")},
        "shards": len(index.get("shards", [])),
        "index": str(Path(a.out) / "index.json"),
    }


def cmd_shard_inspect(a: argparse.Namespace) -> dict:
    from distrib.data.shards import format_inspection, inspect_shards

    summary = inspect_shards(a.dir, strict=False)
    print(format_inspection(summary))
    if summary["problems"]:
        raise DistribError(
            f"{summary['location']}: {len(summary['problems'])} shard problem(s), first: "
            f"{summary['problems'][0]}; re-run 'distrib shard ... --overwrite' to rewrite the shards"
        )
    return summary


def cmd_train(a: argparse.Namespace) -> dict:
    from distrib.config import load_config

    cfg = load_config(a.config, a.overrides)  # validated before any heavy import or process group
    check_outputs("train", dirs={"--out": a.out}, inputs=[a.config], read_dirs=[cfg.data.shards])
    _writer("train", a.out)
    from distrib.training.dist import is_main
    from distrib.training.trainer import run

    result = run(cfg, a.out, resume=a.resume)
    return {k: v for k, v in result.items() if k != "confusion"} if is_main() else None  # one JSON line per run


def cmd_tune(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.sweep.driver import run_sweep
    from distrib.sweep.grid import check_grid, load_grid

    flags = {"tune.search": a.search, "tune.num_samples": a.num_samples, "tune.scheduler": a.scheduler}
    cfg = load_config(a.config, [*a.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)])
    grid = load_grid(a.grid) if a.grid else check_grid(cfg.tune.grid)
    check_outputs("tune", dirs={"--out": a.out}, inputs=[a.config, a.grid], read_dirs=[cfg.data.shards])
    _writer("tune", a.out)
    return run_sweep(cfg, grid, a.out, address=a.address, storage=a.storage, resume=a.resume, num_cpus=a.num_cpus)


def cmd_embed(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.stacking.embed import alignment_path, extract_oof
    from distrib.sweep.report import best_run_dirs

    if bool(a.sweep) == bool(a.runs):
        raise DistribError("distrib embed: pass exactly one of --sweep SWEEP_DIR or --runs RUN0 RUN1 ...")
    runs = best_run_dirs(a.sweep) if a.sweep else list(a.runs)
    cfg = load_config(Path(runs[0]) / "config.yaml", a.overrides)
    outs = check_outputs(
        "embed",
        files={"--out": a.out, "alignment": alignment_path(a.out)},
        read_dirs=[*runs, a.sweep, cfg.data.shards],
    )
    _writer("embed", a.out, is_dir=False)
    df = extract_oof(runs, a.out, cfg.embed)
    outs.report()
    return {
        "out": str(a.out),
        "rows": len(df),
        "alignment": str(alignment_path(a.out)),
        "splits": df["split"].value_counts().to_dict(),
    }


def cmd_stack(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.stacking.stack import fit_stack

    cfg = load_config(a.config, a.overrides).stack
    check_outputs("stack", dirs={"--out": a.out}, inputs=[*a.oof, *(a.stage1 or []), a.config])
    _writer("stack", a.out)
    res = fit_stack(a.oof, a.out, cfg, stage1=a.stage1)
    for name, r in res["ablation"].items():
        print(f"stack: {name:<28} meta-CV AUC {r['auc_mean']:.4f} +- {r['auc_std']:.4f}")
    for name, r in res["candidates"].items():
        mark = " <- chosen" if name == res["meta"] else ""
        print(
            f"stack: meta {name:<23} meta-CV AUC {r['auc_mean']:.4f} +- {r['auc_std']:.4f} "
            f"(vs best expert {r['diff_mean']:+.4f}){mark}"
        )
    for split in res["splits"].values():
        print(f"stack: {split['vs_best_expert']['verdict']}")
    return {
        "out": str(a.out),
        "meta": res["meta"],
        "cv_auc_mean": res["cv"]["auc_mean"],
        "best_expert": res["best_expert"],
    }


def cmd_thresholds(a: argparse.Namespace) -> dict:
    from distrib.config import load_config
    from distrib.stacking.thresholds import fit_thresholds, load_predictions, select_fit_rows

    cfg = load_config(a.config, a.overrides).thresholds
    outs = check_outputs("thresholds", dirs={"--out": a.out}, inputs=[a.pred, a.config])
    outs.existing += [p for p in [Path(a.out) / "thresholds.json"] if p.is_file()]
    result = fit_thresholds(select_fit_rows(load_predictions(a.pred), cfg.fit_split, str(a.pred)), cfg, a.out)
    print(f"thresholds: {result['single']['max_specificity_at_recall']['message']}")
    print(f"thresholds: {'' if result['band']['feasible'] else 'INFEASIBLE: '}{result['band']['message']}")
    outs.report()
    return {"thresholds": str(Path(a.out) / "thresholds.json"), "band": result["band"]}


def cmd_cascade(a: argparse.Namespace) -> dict:
    from distrib.cascade.run import run_cascade

    out = a.out or Path(a.config).parent / f"cascade_{a.split}"  # run_cascade's default, locked here
    check_outputs("cascade", dirs={"--out": out}, inputs=[a.config])
    _writer("cascade", out)
    res = run_cascade(a.config, a.split, out)
    m, cost = res["metrics"]["cascade"], res["cost"]
    print(
        f"cascade: AUC {m['auc']:.4f} F1 {m['f1']:.4f} recall {m['recall']:.4f} specificity {m['specificity']:.4f}; "
        f"escalation {res['escalation_rate']:.1%}; cost {cost['cascade_mean_ms']:.2f} ms/img "
        f"(x{cost['cost_ratio_to_stage1']:.2f} stage 1); report: {res['report']}"
    )
    return {"report": res["report"], "evaluation_results": res["evaluation_results"]}


def cmd_predict(a: argparse.Namespace) -> dict:
    from distrib.inference.predict import predict

    out = Path(a.out)
    model = Path(a.model)
    outs = check_outputs(
        "predict",
        files={
            "--out": out,
            **{f"{k} file": out.with_name(f"{out.stem}_{k}{ext}") for k, ext in _PREDICT_SIDECARS},
        },
        inputs=[a.model, a.thresholds],
        read_dirs=[model if model.is_dir() else None, a.images if Path(a.images).is_dir() else None],
    )
    res = predict(
        a.model,
        a.images,
        a.out,
        device=a.device,
        batch_size=a.batch_size,
        workers=a.workers,
        split=a.split,
        thresholds=a.thresholds,
    )
    print(
        f"predict: {res['n']} images ({res['skipped']} skipped -> {res['skipped_csv']}) at "
        f"{res['images_per_s']:.1f} images/s; decisions {res['decisions']}; predictions: {res['out']}"
    )
    for name, m in res.get("metrics", {}).items():
        print(
            f"predict: {name} AUC {m['auc']:.4f} F1 {m['f1']:.4f} recall {m['recall']:.4f} "
            f"specificity {m['specificity']:.4f} (n={m['n']})"
        )
    outs.report()
    return res


def cmd_export(a: argparse.Namespace) -> dict:
    from distrib.inference.export import export_run

    run = Path(a.run)
    if a.out:  # the default (RUN_DIR/model.onnx) is the one file export owns inside the run folder
        out = Path(a.out)
        outs = check_outputs(
            "export",
            files={"--out": out, "sidecar": out.with_name(out.name + ".json")},
            inputs=[run / "best_model.pth", run / "config.yaml", run],
            read_dirs=[run / "last_checkpoint"],
        )
    else:
        outs = check_outputs("export", files={}, inputs=[run])
    res = export_run(a.run, fmt=a.format, int8=a.int8, out=a.out, threads=a.threads, overrides=a.overrides)
    for name, r in res["artifacts"].items():
        print(
            f"export: {name:<5} {r['path']}: {r['size_mb']:.2f} MB, max |dprob| vs PyTorch {r['max_abs_prob_diff']:.2e}, "
            f"AUC {r['auc']:.4f} (PyTorch {res['torch']['auc']:.4f}), batch-1 latency median "
            f"{r['latency_ms']['median']:.2f} ms p95 {r['latency_ms']['p95']:.2f} ms "
            f"({r['threads']} thread(s)) -> {'PASS' if r['passed'] else 'FAIL'}"
        )
    outs.report()
    print(strict_json(res), flush=True)  # the last line is one JSON object
    return res


def configs_overrides(recipe: Path, configs: Path) -> list[str]:
    """``distrib demo --configs DIR``: the recipe's stage-1, expert and grid files by name, read from DIR's
    experiments/ and grids/ instead, so the flag swaps where the files live, never which models run."""
    from distrib.recipes import load_recipe

    root, spec = configs.resolve(), load_recipe(recipe)
    experts = [
        {
            "experiment": str(root / "experiments" / Path(e.experiment).name),
            "grid": str(root / "grids" / Path(e.grid or "demo.yaml").name),
        }
        for e in spec.experts
    ]
    return [
        f"stage1.experiment={root / 'experiments' / Path(spec.stage1.experiment).name}",
        f"experts={json.dumps(experts)}",
    ]


def cmd_demo(a: argparse.Namespace) -> dict:
    from distrib.demo.pipeline import run_demo

    recipe = Path(a.recipe or DEMO_RECIPE)
    if not recipe.is_file():
        raise DistribError(
            f"demo recipe not found: {recipe}; run from the repository root or pass --recipe launch/recipes/demo.yaml"
        )
    overrides = list(a.overrides)
    if a.configs:  # the older flag: the recipe's own experiment and grid files, read from another folder
        overrides = [*configs_overrides(recipe, Path(a.configs)), *overrides]
    res = run_demo(a.out, recipe, size=a.size, overrides=overrides)
    print(
        f"\n{res['leak_check']}\nreport: {res['report']}\nresults: {res['results']}\nTensorBoard: {res['tensorboard']}\n"
        f"predictions for the folder {res['predicted_images']}: {res['predictions']}"
    )
    return res


def cmd_run(a: argparse.Namespace) -> dict:
    from distrib.recipes import run_recipe

    check_outputs("run", dirs={"--out": a.out}, inputs=[a.recipe])
    _writer("run", a.out)
    res = run_recipe(a.recipe, a.out, a.overrides, overwrite=a.overwrite, address=a.address, num_cpus=a.num_cpus)
    print(f"\nreport: {res['report']}\nresults: {res['results']}\nTensorBoard: {res['tensorboard']}")
    return res


def cmd_bench(a: argparse.Namespace) -> dict:
    from distrib.bench import run_bench

    if a.steps < 1 or a.workers < 0 or a.num_processes < 1:
        raise DistribError(
            f"distrib bench: --steps {a.steps}, --workers {a.workers} and --num-processes "
            f"{a.num_processes} must be >= 1, >= 0 and >= 1"
        )
    result = run_bench(
        a.name,
        shards=a.shards,
        config=a.config,
        out=a.out,
        workers=a.workers,
        steps=a.steps,
        num_processes=a.num_processes,
        overrides=a.overrides,
        vs=a.vs,
    )
    print(json.dumps(result, default=float), flush=True)  # the last line is the benchmark's JSON
    return result


def cmd_weights_import(a: argparse.Namespace) -> dict:
    from distrib.models.weights import import_weights

    out = Path(a.out)
    inputs = [] if a.src.startswith("pkg:") else [a.src]
    outs = check_outputs(
        "weights import", files={"--out": out, "record": out.with_name(out.name + ".json")}, inputs=inputs
    )
    record = import_weights(a.src, a.model, out)
    outs.report()
    return {k: v for k, v in record.items() if k != "mapping"}  # the full mapping is in OUT.json
