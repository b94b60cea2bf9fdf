"""A feature whose extra is not installed fails before anything starts: exit 2, one line naming the extra.

The packages are made unimportable for real: `distrib` runs in a subprocess whose first meta-path finder
refuses them, exactly as Python does for a package that is not installed.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, subprocess_env
from distrib.extras import MissingExtra, installed, require

# Runs the distrib CLI with BLOCKED (comma-separated top-level modules) unimportable.
_WRAPPER = """
import os, sys
blocked = set(os.environ["BLOCKED"].split(","))
class _NotInstalled:  # wraps the path finder: a blocked package is found nowhere, as when it is not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [_NotInstalled(f) for f in sys.meta_path]
from distrib.cli import main
sys.exit(main(sys.argv[1:]))
"""

DEBUG = "launch/configs/experiments/debug.yaml"


def _shards(tmp_path):  # an existing folder: the extra is checked before the shards are read
    (tmp_path / "shards").mkdir(exist_ok=True)
    return tmp_path / "shards"


def _grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    return str(path)


CASES = {
    "deepspeed": (
        "deepspeed",
        lambda t: ["train", DEBUG, "--out", str(t / "run"), f"data.shards={_shards(t)}"],
        {"ACCELERATE_USE_DEEPSPEED": "true"},
        "an accelerate DeepSpeed config needs deepspeed",
    ),
    # accelerate's DeepSpeed plugin imports transformers.integrations whatever zero3_init_flag says
    "deepspeed-transformers": (
        "transformers",
        lambda t: ["train", DEBUG, "--out", str(t / "run"), f"data.shards={_shards(t)}"],
        {"ACCELERATE_USE_DEEPSPEED": "true"},
        "an accelerate DeepSpeed config needs transformers",
    ),
    "export": (
        "onnxruntime",
        lambda t: ["export", str(t / "no_run"), "--format", "onnx"],
        {},
        "distrib export --format onnx needs onnxruntime",
    ),
    "search": (
        "optuna",
        lambda t: [
            "tune",
            DEBUG,
            "--out",
            str(t / "sweep"),
            "--search",
            "optuna",
            "--num-samples",
            "2",
            "--grid",
            _grid(t),
            f"data.shards={_shards(t)}",
        ],
        {},
        "tune.search=optuna needs optuna",
    ),
}


@pytest.mark.parametrize("extra", sorted(CASES))
def test_missing_extra_is_one_line_naming_it(extra, tmp_path):
    module, argv, env_extra, start = CASES[extra]
    extra = extra.split("-")[0]
    env = {**subprocess_env(tmp_path), "BLOCKED": module, **env_extra}
    proc = subprocess.run(
        [PYTHON, "-c", _WRAPPER, *argv(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "pip install" in ln]
    assert len(lines) == 1, proc.stderr
    assert start in lines[0] and f"pip install 'distrib[{extra}]'" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep" / "trials").exists()


def test_require_names_every_missing_module_and_passes_installed_ones():
    require("yaml", "numpy", extra="x", feature="f")  # installed: nothing raised
    assert installed("yaml") and not installed("distrib_no_such_module")
    with pytest.raises(MissingExtra, match=r"f needs distrib_no_such_module, .*pip install 'distrib\[x\]'"):
        require("yaml", "distrib_no_such_module", extra="x", feature="f")
