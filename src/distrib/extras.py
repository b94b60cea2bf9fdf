"""Optional parts of the install (setup.cfg's extras): a feature that needs one checks for it before it starts.

DeepSpeed, MLflow, the ONNX stack and Optuna are extras because most runs load none of them. A missing
one must fail where the config is validated, with one line naming the extra, not as an ImportError
traceback from deep inside accelerate, Ray or torch.onnx after a process group or cluster is up.
"""

from __future__ import annotations

import importlib.util

from distrib.errors import DistribError


class MissingExtra(DistribError, ImportError):
    """A feature's optional package is not importable; the message names the extra to install."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, without importing it (DeepSpeed's import alone takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a broken __spec__
        return False


def require(*modules: str, extra: str, feature: str) -> None:
    """Raise MissingExtra naming ``extra`` when any of ``modules`` is missing; ``feature`` is what the user asked for."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        names = ", ".join(missing)
        raise MissingExtra(
            f"{feature} needs {names}, which is not installed; pip install 'distrib[{extra}]' "
            f"(or pip install 'distrib[all]')"
        )
