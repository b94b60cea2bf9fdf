"""Stage 6 of the pipeline: using what was trained on new images, and shipping it.

Public face: ``predict.predict`` (a run or a cascade YAML applied to a folder, a CSV list or a shard
dir -> one CSV row per image, <out>_skipped.csv, group scores, metrics when labels exist),
``predict.load_scorer``, ``images.open_images`` (the input reader) and ``export.export_run`` (a run's
best model + its preprocessing -> ONNX or TorchScript, validated against PyTorch on real val images,
timed on ONNX Runtime at batch 1, optional int8, pass/fail against the ``export`` config targets).
"""
