"""The bundled demo: a real-photo dataset built offline, its leak checks, and the end-to-end job.

Public face: ``data.build_demo_dataset`` (tiles of photos shipped in PyPI wheels, half of them
manipulated), ``checks.histogram_leak_check`` and ``checks.residual_reference`` (what the data can
and cannot give away), and ``pipeline.run_demo`` (every stage in order, each through its own public
function). Only the CLI and the benchmarks import this package.
"""
