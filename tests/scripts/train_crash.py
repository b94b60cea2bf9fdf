"""Run launch/train.py's main, but SIGKILL this process while the Nth checkpoint is being published.

    python tests/scripts/train_crash.py N CONFIG --out RUN_DIR [overrides]

The kill lands after the new checkpoint's files are written to last_checkpoint.tmp/ and before the
rename, i.e. the worst moment for atomicity; the (N-1)th checkpoint must survive intact.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import distrib.training.checkpoint as checkpoint

kill_at = int(sys.argv.pop(1))
calls = {"n": 0}
publish = checkpoint._publish


def _publish_or_die(tmp, final):
    calls["n"] += 1
    if calls["n"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final)


checkpoint._publish = _publish_or_die
sys.argv = [str(Path(__file__).resolve().parents[2] / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
