"""Benchmarks: `distrib bench NAME` measures a ratio against a baseline in the same run.

Each ``bench/<name>.py`` has ``run(**options) -> dict``; ``distrib bench`` prints that dict as one JSON
object on the last line of its output. Benchmarks are doors like the CLI: they may use the demo builder.

Public face: ``run_bench(name, **options)`` for NAME in loader, trainer, latency, sweep, cascade.
"""

from __future__ import annotations

import importlib
import inspect

NAMES = ("loader", "trainer", "latency", "sweep", "cascade")


def run_bench(name: str, **options) -> dict:
    """Run benchmark ``name`` with the options its ``run`` takes (shards, config, out, workers, steps, ...)."""
    if name not in NAMES:
        from distrib.errors import DistribError

        raise DistribError(f"unknown benchmark '{name}'; choose one of {', '.join(NAMES)}")
    run = importlib.import_module(f"distrib.bench.{name}").run
    accepted = inspect.signature(run).parameters
    return run(**{k: v for k, v in options.items() if k in accepted})
