"""Write group-aware K-fold WebDataset shards from path,label[,group] manifests.

    python shards/write_shards.py --train train_manifest.csv --val val_manifest.csv \
        --test test_manifest.csv --out shards/ --folds 5 [--workers 2] [--overwrite]

Same as ``distrib shard ...``: both call distrib.data.shards.write_shards.
"""

import sys

from distrib.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", *sys.argv[1:]]))
