"""Train one experiment on 1..N processes; DDP or DeepSpeed is picked by the accelerate config file.

    # 2 CPU processes over gloo (NOT `--cpu`, which silently starts only one):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch/train.py \
        launch/configs/debug.yaml --out runs/debug data.shards=shards/
    # GPUs, DDP / DeepSpeed ZeRO-2:
    accelerate launch --config_file accelerate_config.yaml launch/train.py CONFIG --out RUN_DIR
    accelerate launch --config_file launch/deepspeed_zero2.yaml launch/train.py CONFIG --out RUN_DIR
    # continue a killed run from RUN_DIR/last_checkpoint:
    accelerate launch ... launch/train.py CONFIG --out RUN_DIR --resume
"""
from __future__ import annotations

import argparse
import json
import sys

from distrib.config import load_config
from distrib.errors import DistribError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="experiment YAML, e.g. launch/configs/debug.yaml")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, best_model.pth)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last_checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards=shards/ optim.lr=3e-4")
    return p.parse_intermixed_args(argv)  # overrides may follow --out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # validated before any process group exists
        from distrib.train import run  # heavy imports only after the config is known to be good
        result = run(cfg, args.out, resume=args.resume)
    except DistribError as e:
        print(f"launch/train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    from distrib.dist import print0
    print0(json.dumps({k: v for k, v in result.items() if k != "confusion"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
