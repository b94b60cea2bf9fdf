"""Train one experiment on 1..N processes; DDP or DeepSpeed is picked by the accelerate config file.

    # 2 CPU processes over gloo (NOT `--cpu`, which silently starts only one):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 launch/train.py \
        launch/configs/experiments/debug.yaml --out runs/debug data.shards=shards/
    # GPUs, DDP / DeepSpeed ZeRO-2:
    accelerate launch --config_file accelerate_config.yaml launch/train.py CONFIG --out RUN_DIR
    accelerate launch --config_file launch/deepspeed_zero2.yaml launch/train.py CONFIG --out RUN_DIR
    # continue a killed run from RUN_DIR/last_checkpoint:
    accelerate launch ... launch/train.py CONFIG --out RUN_DIR --resume

This door is `distrib train` under another name: the same parser, then the same steps in
distrib.cli's `train` command: resolve the config (errors before any process group exists),
build, train (distrib.training.trainer.run), close, and print the result once, on rank 0.
"""

import sys

from distrib.cli import main


def train(argv: list[str]) -> int:
    """``launch/train.py CONFIG --out RUN_DIR [--resume] [overrides]``; returns the exit code."""
    return main(["train", *argv])


if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
