"""Verify a shard directory (or URL): sha256 and sample count of every shard, no group in two folds.

    python shards/inspect_shards.py shards/

Same as ``distrib shard inspect DIR``: both call distrib.data.shards.inspect_shards.
"""

import sys

from distrib.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "inspect", *sys.argv[1:]]))
