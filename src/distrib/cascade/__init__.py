"""Stage 5 of the pipeline: the cascade (fast filter -> experts -> meta-model) run on a split.

Public face: ``config.load_cascade_config`` (the cascade YAML), ``run.run_cascade`` (stream a split
through the stages, with per-image cost), ``evaluate.evaluate_cascade`` (metrics, plots, JSON),
``report.write_report`` (report.md) and ``complementarity.analyse`` (where the experts disagree).
Building blocks shared with ``distrib predict``: ``run.Stage`` (a run's model fed its own eval
preprocessing), ``run.Expert`` (an expert's K fold models, or its one refit model, aligned),
``run.MultiSizeTransform`` (one decode, each stage's size), ``run.fit_or_load`` (a stage's thresholds,
fit on val/OOF only) and ``run.resolve_device``.
"""
