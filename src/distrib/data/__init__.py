"""Stage 1 of the pipeline, the data: manifests -> group-aware K-fold WebDataset shards -> batches.

Public face: ``manifest.read_manifest`` (path,label[,group] CSVs), ``shards.write_shards`` and
``shards.inspect_shards`` (the shard writer and its verifier), ``index.read_index`` and
``index.plan_split`` (which shards a rank and worker read), ``loader.build_loader`` (streams a split
to one rank) and ``transforms.build_transform`` (decode, resize, augment, normalize).
"""
