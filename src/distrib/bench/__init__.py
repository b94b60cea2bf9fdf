"""Benchmarks: `distrib bench NAME` measures a ratio against a baseline in the same run.

Each ``bench/<name>.py`` has ``run(args) -> dict`` and prints that dict as one JSON object on its
last line of output.
"""
from __future__ import annotations

import importlib
import json

NAMES = ("loader", "trainer", "latency", "sweep", "cascade")


def run_bench(name: str, args) -> dict:
    if name not in NAMES:
        from distrib.errors import DistribError
        raise DistribError(f"unknown benchmark '{name}'; choose one of {', '.join(NAMES)}")
    result = importlib.import_module(f"distrib.bench.{name}").run(args)
    print(json.dumps(result, default=float), flush=True)
    return result
