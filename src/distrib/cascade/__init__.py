"""Stage 5 of the pipeline: the cascade (fast filter -> experts -> meta-model) run on a split.

Public face: ``config.load_cascade_config`` (the cascade YAML), ``run.run_cascade`` (stream a split
through the stages, with per-image cost), ``evaluate.evaluate_cascade`` (metrics, plots, JSON),
``report.write_report`` (report.md) and ``complementarity.analyse`` (where the experts disagree).
"""
