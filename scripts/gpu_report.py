"""The GPU check's records and report (stdlib only: it runs before and without the venv).

    python scripts/gpu_report.py step OUT NAME RC SECONDS BUDGET [LOG]   # one step's outcome -> OUT/steps.jsonl
    python scripts/gpu_report.py skip OUT NAME REASON                   # a step not run here -> OUT/steps.jsonl
    python scripts/gpu_report.py write OUT                              # OUT/gpu_report.json and gpu_report.md

scripts/gpu_check.sh calls it; the step records let a report be written whatever step timed out.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_step(out: Path, name: str, rc: int, seconds: float, budget: int, log: str = "") -> None:
    status = "ok" if rc == 0 else "timed out" if rc in (124, 137) else f"failed (exit {rc})"
    tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:] if log and Path(log).is_file() else []
    row = {"step": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "budget_s": budget, "tail": tail}
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def record_skip(out: Path, name: str, reason: str) -> None:
    row = {"step": name, "status": f"skipped: {reason}", "rc": None, "seconds": 0, "budget_s": 0, "tail": []}
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _bench(path: Path) -> dict | None:
    """The last line of `distrib bench` stdout is its JSON."""
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _junit(path: Path) -> list[dict]:
    """Test rows from pytest's junit XML: the fallback when the per-test records are missing."""
    if not path.is_file():
        return []
    rows = []
    for case in ET.parse(path).iter("testcase"):
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (el.get("message") or "").strip().splitlines()[0][:300] if el.get("message") else ""
                break
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        rows.append(
            {"test": name, "when": "call", "outcome": outcome, "seconds": float(case.get("time", 0)), "reason": reason}
        )
    return rows


def _note(env: dict, steps: list[dict]) -> str:
    if not env:
        return "the env step wrote no facts (no torch in the venv?): see logs/env.log"
    if not env.get("cuda_available"):
        return "no CUDA here: the gpu tests skip, and the benches ran as a small CPU smoke run or not at all (no GPU figures)"
    late = [s["step"] for s in steps if s["status"] not in ("ok",) and not s["status"].startswith("skipped")]
    return f"steps not ok: {', '.join(late)}" if late else ""


def build(out: Path) -> dict:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    smi = (out / "nvidia-smi.txt").read_text() if (out / "nvidia-smi.txt").is_file() else "no nvidia-smi"
    benches = {p.stem: _bench(p) for p in sorted((out / "bench").glob("*.out"))}
    tests = _jsonl(out / "tests.jsonl") or _junit(out / "junit.xml")
    order = out / "tests.jsonl.order"
    seen = {t["test"] for t in tests}
    for nodeid in order.read_text().split() if order.is_file() else []:
        if nodeid not in seen:  # planned, but the step's budget ran out first
            tests.append({"test": nodeid, "when": "", "outcome": "not run", "seconds": 0, "reason": "step budget"})
    steps = _jsonl(out / "steps.jsonl")
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {
        "env": env,
        "nvidia_smi": smi.strip(),
        "steps": steps,
        "tests": tests,
        "test_counts": counts,
        "bench": benches,
        "note": _note(env, steps),
    }


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested bench figures as dotted keys, one table row each."""
    rows = {}
    for k, v in d.items():
        if isinstance(v, dict):
            rows.update(_flat(v, f"{prefix}{k}."))
        else:
            rows[f"{prefix}{k}"] = v
    return rows


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md(r: dict) -> str:
    env = r["env"]
    lines = ["# GPU check", ""]
    if r["note"]:
        lines += [f"**{r['note']}**", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in env.items()] + [""]
    lines += ["## Steps", "", "| step | status | seconds | budget |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['budget_s']} |" for s in r["steps"]]
    lines += ["", f"## Tests ({', '.join(f'{v} {k}' for k, v in r['test_counts'].items()) or 'none recorded'})", ""]
    lines += ["| test | outcome | seconds | reason |", "|---|---|---|---|"]
    lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | {_cell(t['reason'][:160])} |" for t in r["tests"]]
    lines += ["", "## Benchmarks", ""]
    for name, b in r["bench"].items():
        lines.append(f"### {name}")
        if b is None:
            lines += ["", "no result (see the step's status and logs/)", ""]
            continue
        lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in _flat(b).items()] + [""]
    lines += ["## nvidia-smi", "", "```", r["nvidia_smi"], "```", ""]
    return "\n".join(lines)


def write(out: Path) -> dict:
    r = build(out)
    _atomic(out / "gpu_report.json", json.dumps(r, indent=1, default=str) + "\n")
    _atomic(out / "gpu_report.md", _md(r))
    return r


def main(argv: list[str]) -> int:
    if argv[:1] == ["step"] and len(argv) in (6, 7):
        record_step(Path(argv[1]), argv[2], int(argv[3]), float(argv[4]), int(argv[5]), *argv[6:])
        return 0
    if argv[:1] == ["skip"] and len(argv) == 4:
        record_skip(Path(argv[1]), argv[2], argv[3])
        return 0
    if argv[:1] == ["write"] and len(argv) == 2:
        r = write(Path(argv[1]))
        print(f"{argv[1]}/gpu_report.md: {len(r['steps'])} steps, {r['test_counts'] or 'no tests'}")
        return 0
    print(__doc__.strip().splitlines()[2:4], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
