"""Entry point for the K-fold x grid Ray Tune sweep (same library function as ``distrib tune``).

    python tune/sweep.py launch/configs/experiments/debug.yaml data.shards=shards/ \
        --grid launch/configs/grids/debug.yaml --out runs/sweep [--address HOST:PORT] [--num-cpus 2] [--resume]
"""

from __future__ import annotations

import sys

from distrib.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
