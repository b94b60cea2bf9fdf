"""Stage 1 of the pipeline, the data: manifests -> group-aware K-fold WebDataset shards -> batches.

Public face: ``manifest.read_manifest`` (path,label[,group] CSVs) and ``manifest.resolve_labels``
(binary labels, explicit positive class), ``shards.write_shards`` and ``shards.inspect_shards`` (the
shard writer and its verifier), ``images.to_rgb8`` (one defined 8-bit RGB conversion for every image
mode), ``verify.verify_shards`` (what training checks before it trusts an index),
``index.read_index`` and ``index.plan_split`` (which shards a rank and worker read),
``loader.build_loader`` (streams a split to one rank; ``Loader.to_device`` finishes a batch on the
model's device when augmentation is placed there; uint8 batches go through ``ring.Ring``, a shared-memory
ring the workers decode into, when ``ring.ring_usable``; ``decode`` holds the plain per-sample stages) and ``transforms.build_transform`` (decode,
resize, augment, normalize), ``transforms.augment_placement`` (augment.device / data.decode_device)
and ``transforms.decode_batch`` (batched JPEG decode on a device).
"""
