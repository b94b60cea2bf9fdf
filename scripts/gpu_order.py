"""pytest plugin for scripts/gpu_check.sh: the most informative GPU tests first, each outcome saved as it lands.

    PYTHONPATH=scripts GPU_CHECK_RESULTS=out/tests.jsonl python -m pytest -p gpu_order -m gpu tests/

A check cut off by its time budget still knows what ran: junit XML is written only at the end, so every
report line is appended to GPU_CHECK_RESULTS as soon as the test finishes, and the planned order goes to
GPU_CHECK_RESULTS.order at collection, so the tests the budget left out are named too.
"""

from __future__ import annotations

import json
import os

import pytest

# train bf16, resume, NCCL, predict on CUDA, then the rest in file order
FIRST = (
    "test_train_on_one_gpu",
    "test_resume_on_gpu_continues_like_an_uninterrupted_run",
    "test_accelerate_launch_one_process_nccl",
    "test_predict_on_cuda_equals_cpu",
)


def _rank(item) -> int:
    name = item.originalname or item.name
    if name == FIRST[0] and "[bf16]" not in item.name:  # train's other cases (fp16, compile, ...) are "the rest"
        return len(FIRST)
    return FIRST.index(name) if name in FIRST else len(FIRST)


def pytest_collection_modifyitems(session, config, items):
    items[:] = sorted(items, key=_rank)  # sorted is stable: the rest keep their order


@pytest.hookimpl(trylast=True)  # after -m has deselected: the tests that will run, in their order
def pytest_collection_finish(session):
    path = os.environ.get("GPU_CHECK_RESULTS")
    if path:  # a test with no record when the budget ran out is reported as not run
        with open(path + ".order", "w") as f:
            f.write("".join(item.nodeid + "\n" for item in session.items))


def pytest_runtest_logreport(report):
    path = os.environ.get("GPU_CHECK_RESULTS")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    reason = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
    elif report.failed:
        reason = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
    row = {
        "test": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 2),
        "reason": reason,
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
