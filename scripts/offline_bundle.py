"""Wheels an offline GPU node lacks, for its Python and platform, at the lock's versions.

    python scripts/offline_bundle.py --python 3.12 --out bundle/ [--have freeze.txt] [--slim]
    make offline-bundle PY=3.12 OUT=bundle/ [HAVE=freeze.txt] [SLIM=1]

The requirement set is distrib's install_requires plus the chosen extras (and the test runner), closed
over each wheel's own Requires-Dist for the target's markers. A package the node's ``pip freeze`` (HAVE;
default scripts/gpu_node_freeze.txt) already holds is neither downloaded nor replaced, and its version
must satisfy what the new wheels ask of it. Everything else is pinned by the lock (constraints*.txt) and
fetched with ``pip download --no-deps`` for the target tags; an sdist-only package (DeepSpeed) is built
into a wheel here. Stdlib only, plus the ``packaging`` that every pip vendors, so any Python with pip runs
it. Writes OUT/*.whl and OUT/manifest.json, and prints each wheel's size and the total.
"""

from __future__ import annotations

import argparse
import configparser
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip vendors the same library; the script must not need an install of its own
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HAVE = REPO / "scripts" / "gpu_node_freeze.txt"
# What the GPU check exercises. [search] (optuna + SQLAlchemy, 5.3 MiB) and [mlflow] are left out by default:
# no GPU test runs them, and the bundle plus the tracked tree must fit a 64 MiB transfer.
DEFAULT_EXTRAS = "deepspeed,export"
DEFAULT_WITH = "pytest,pytest-timeout"  # from the [test] extra: what scripts/gpu_check.sh needs to run the suite
DEFAULT_SKIP = ""  # --skip a,b: packages the target provides some other way (the manifest lists them)
# pip 23 does not widen --platform manylinux_2_28 to the older manylinux tags it implies, so name them all.
MANYLINUX = [f"manylinux_2_{v}_x86_64" for v in range(28, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
# --slim repacks these wheels. Ray's Java jars (ray/jars) load only for cross-language Java workers; the
# dashboard's built web client only serves the browser UI, and distrib starts Ray with include_dashboard=False.
# transformers is there only for accelerate's DeepSpeed plugin (transformers.integrations.HfDeepSpeedConfig):
# its 400 model families are never imported, but the package's import walks models/ and needs models/auto.
# A path under "keep" stays even when it is under "drop".
SLIM = {
    "ray": {"drop": ("ray/jars/", "ray/dashboard/client/build/"), "keep": ()},
    "transformers": {
        "drop": ("transformers/models/",),
        "keep": ("transformers/models/__init__.py", "transformers/models/auto/"),
    },
}
# Members this large (Ray's raylet, GCS server and _raylet.so, 30 MiB deflated) are stored LZMA-compressed in a
# slim wheel: 30% smaller than deflate. ZIP method 14 is read by the stdlib zipfile that pip installs with.
SLIM_LZMA_BYTES = 1 << 20


class BundleError(Exception):
    """Bad input or an unresolvable set: one line for the user, no traceback."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_freeze(text: str) -> dict[str, str]:
    """``pip freeze`` text -> {canonical name: version}. ``name @ url`` and ``-e`` lines count as held
    (version "" when the line has none): the node has them, so they are not downloaded."""
    held = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("-e") else raw.strip()
        if not line or line.startswith(("-r", "-c", "--")):
            continue
        if line.startswith("-e"):
            egg = re.search(r"[#&]egg=([A-Za-z0-9_.\-]+)", line)
            if egg:
                held[canonical(egg.group(1))] = ""
            continue
        if " @ " in line:
            held[canonical(line.split(" @ ", 1)[0].strip())] = ""
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise BundleError(f"freeze line {raw!r}: expected 'name==version' (pip freeze output)")
        held[canonical(name.strip())] = version.strip()
    return held


def parse_lock(paths: list[Path]) -> dict[str, str]:
    pins = {}
    for path in paths:
        for name, version in parse_freeze(path.read_text()).items():
            pins.setdefault(name, version)
    return pins


def project_requirements(setup_cfg: Path, extras: list[str], with_names: list[str]) -> list[str]:
    """install_requires + the named extras + the named entries of the [test] extra, as requirement strings."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)

    def lines(section, key):
        text = cfg.get(section, key, fallback="")
        return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]

    reqs = lines("options", "install_requires")
    known = set(cfg.options("options.extras_require")) if cfg.has_section("options.extras_require") else set()
    for extra in extras:
        if extra not in known:
            raise BundleError(f"--extras {extra}: setup.cfg has no such extra; use one of {', '.join(sorted(known))}")
        reqs += [r for r in lines("options.extras_require", extra) if not r.startswith("distrib[")]
    test = {canonical(Requirement(r).name): r for r in lines("options.extras_require", "test")}
    for name in with_names:
        if canonical(name) not in test:
            raise BundleError(f"--with {name}: not in setup.cfg's [test] extra ({', '.join(sorted(test))})")
        reqs.append(test[canonical(name)])
    return reqs


def target_environment(python: str) -> dict[str, str]:
    if not re.fullmatch(r"3\.\d+(\.\d+)?", python):
        raise BundleError(f"--python {python!r}: give the target's Python version, e.g. 3.12 or 3.12.3")
    env = default_environment()
    full = python if python.count(".") == 2 else python + ".0"
    env.update(
        python_version=".".join(full.split(".")[:2]),
        python_full_version=full,
        implementation_name="cpython",
        implementation_version=full,
        platform_python_implementation="CPython",
        os_name="posix",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
    )
    return env


def requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg.get_all("Requires-Dist") or []


def closure(roots: list[str], have: dict[str, str], lock: dict[str, str], env: dict, fetch, skip=()) -> tuple:
    """({name: version} to bundle, {name: wheel path}, [(held name, node's version, needed by)]).

    ``fetch({name: version})`` brings those wheels and returns {name: wheel path}. Requirements are followed
    with the extras asked of each package; a held package stops the walk (the node's own copy stays)."""
    want: dict[str, str] = {}
    extras: dict[str, set] = {"distrib": {""}}
    wheels: dict[str, Path] = {}
    leaned, skipped = [], set()
    pending = [(Requirement(r), "distrib") for r in roots]
    while pending:
        todo = {}
        for req, parent in pending:
            asked = extras[parent] | {""}
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in asked):
                continue
            name = canonical(req.name)
            if name in skip:
                skipped.add(name)
                continue
            if name in have:
                v = have[name]
                if v and not req.specifier.contains(Version(v), prereleases=True):
                    raise BundleError(
                        f"{parent} needs {req} but the node has {name}=={v}; "
                        f"upgrade it there or pass a --have freeze that holds a matching {name}"
                    )
                leaned.append((name, v, parent))
                continue
            if name not in lock:
                raise BundleError(
                    f"{name} (needed by {parent}) has no pin in the lock; add it to constraints*.txt (make lock)"
                )
            if not req.specifier.contains(Version(lock[name]), prereleases=True):
                raise BundleError(f"{parent} needs {req} but the lock pins {name}=={lock[name]}; re-lock (make lock)")
            new_extras = set(req.extras) - extras.get(name, set())
            extras.setdefault(name, set()).update(req.extras)
            if name not in want or new_extras:  # ray first met bare, then as ray[tune]: walk it again
                want[name] = lock[name]
                todo[name] = lock[name]
        wheels.update(fetch({n: v for n, v in todo.items() if n not in wheels}))
        pending = [(Requirement(r), name) for name in todo for r in requires_dist(wheels[name])]
    return want, wheels, leaned, sorted(skipped)


def _pip(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], text=True, **kw)


class Downloader:
    """``pip download --no-deps`` for the target's tags into a cache folder; sdist-only packages are built."""

    def __init__(self, python: str, cache: Path):
        self.python, self.cache = python, cache
        self.tags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
        for p in MANYLINUX:
            self.tags += ["--platform", p]
        cache.mkdir(parents=True, exist_ok=True)

    def _find(self, name: str, version: str) -> Path | None:
        for whl in self.cache.glob("*.whl"):
            dist, ver = whl.name.split("-")[:2]
            if canonical(dist) == name and ver == version:
                return whl
        return None

    def __call__(self, pins: dict[str, str]) -> dict[str, Path]:
        missing = {n: v for n, v in pins.items() if self._find(n, v) is None}
        if missing:
            specs = [f"{n}=={v}" for n, v in missing.items()]
            r = _pip(["download", "-q", "--no-deps", *self.tags, "-d", str(self.cache), *specs], capture_output=True)
            if r.returncode:  # one at a time, to learn which need a build from the sdist
                for n, v in missing.items():
                    one = _pip(
                        ["download", "-q", "--no-deps", *self.tags, "-d", str(self.cache), f"{n}=={v}"],
                        capture_output=True,
                    )
                    if one.returncode:
                        self._build(n, v)
        out = {}
        for n, v in pins.items():
            whl = self._find(n, v)
            if whl is None:
                raise BundleError(f"{n}=={v}: no wheel for Python {self.python} manylinux x86_64 and no sdist to build")
            out[n] = whl
        return out

    def _build(self, name: str, version: str) -> None:
        """Build a wheel from the sdist with build isolation (its build deps from the same indexes); DeepSpeed's
        setup.py then finds no torch and pre-compiles no ops (DS_BUILD_OPS=0 says so explicitly): a pure wheel
        that JIT-builds ops on the node if asked."""
        with tempfile.TemporaryDirectory(prefix="sdist_") as tmp:
            r = _pip(
                ["download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, f"{name}=={version}"],
                capture_output=True,
            )
            if r.returncode:
                raise BundleError(
                    f"{name}=={version}: neither a wheel for the target nor an sdist: "
                    f"{r.stderr.strip().splitlines()[-1:]}"
                )
            sdist = next(Path(tmp).iterdir())
            env = {**os.environ, "DS_BUILD_OPS": "0"}
            r = _pip(["wheel", "-q", "--no-deps", "-w", tmp + "/w", str(sdist)], capture_output=True, env=env)
            built = list(Path(tmp, "w").glob("*.whl")) if r.returncode == 0 else []
            if not built or not built[0].name.endswith("-none-any.whl"):
                raise BundleError(
                    f"{name}=={version}: building a pure wheel from {sdist.name} failed: "
                    f"{(r.stderr.strip().splitlines() or ['not pure python'])[-1]}"
                )
            shutil.move(str(built[0]), self.cache / built[0].name)


def _record_hash(data: bytes) -> str:
    return "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(src: Path, dst: Path, drop: tuple[str, ...], keep: tuple[str, ...] = ()) -> tuple[int, int]:
    """Copy wheel ``src`` to ``dst`` without the entries under ``drop`` (unless under ``keep``), members of
    SLIM_LZMA_BYTES or more LZMA-compressed; RECORD loses the dropped rows, so pip installs (and uninstalls)
    it cleanly. Returns (files dropped, files stored as LZMA)."""

    def dropped_path(name: str) -> bool:
        return name.startswith(drop) and not name.startswith(keep)

    dropped = packed = 0
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1)
        for info in zin.infolist():
            if info.filename == record:
                continue
            if dropped_path(info.filename):
                dropped += 1
                continue
            data = zin.read(info.filename)  # before compress_type changes: zin reads through the same ZipInfo
            big = info.file_size >= SLIM_LZMA_BYTES
            packed += big
            info.compress_type = zipfile.ZIP_LZMA if big else zipfile.ZIP_DEFLATED
            zout.writestr(info, data, compresslevel=None if big else 9)
        rows = [ln for ln in zin.read(record).decode().splitlines() if ln and not dropped_path(ln)]
        zout.writestr(record, "\n".join(rows) + "\n")
    os.replace(tmp, dst)
    return dropped, packed


def build_bundle(python, out, have_text, lock_paths, extras, with_names, slim, cache, skip=()) -> dict:
    env = target_environment(python)
    have = parse_freeze(have_text)
    lock = parse_lock(lock_paths)
    roots = project_requirements(REPO / "setup.cfg", extras, with_names)
    fetch = Downloader(python, cache)
    want, wheels, leaned, skipped = closure(roots, have, lock, env, fetch, {canonical(n) for n in skip})
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    rows = []
    for name in sorted(want):
        src = wheels[name]
        dst = out / src.name
        note = ""
        if slim and name in SLIM:
            n, packed = slim_wheel(src, dst, SLIM[name]["drop"], SLIM[name]["keep"])
            kept = f" (kept {', '.join(SLIM[name]['keep'])})" if SLIM[name]["keep"] else ""
            note = f"slim: {n} files under {', '.join(SLIM[name]['drop'])} dropped{kept}, {packed} stored as LZMA"
        else:
            shutil.copy2(src, dst)
        rows.append({"name": name, "version": want[name], "wheel": dst.name, "bytes": dst.stat().st_size, "note": note})
    total = sum(r["bytes"] for r in rows)
    manifest = {
        "python": python,
        "platform": "manylinux_2_28_x86_64",
        "extras": extras,
        "with": with_names,
        "slim": slim,
        "lock": [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in lock_paths],
        "wheels": rows,
        "total_bytes": total,
        "skipped": skipped,
        "held_by_node": sorted({n: v for n, v, _ in leaned}.items()),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", required=True, help="target Python version, e.g. 3.12")
    p.add_argument("--out", required=True, type=Path, help="bundle folder (its *.whl are replaced)")
    p.add_argument("--have", type=Path, default=DEFAULT_HAVE, help="the target's pip freeze (default: %(default)s)")
    p.add_argument("--constraints", type=Path, action="append", help="lock file(s); default constraints.txt")
    p.add_argument("--extras", default=DEFAULT_EXTRAS, help="setup.cfg extras to include (default: %(default)s)")
    p.add_argument("--with", dest="with_names", default=DEFAULT_WITH, help="[test] entries (default: %(default)s)")
    p.add_argument("--skip", default=DEFAULT_SKIP, help="packages left out (default: %(default)s)")
    p.add_argument("--slim", action="store_true", help="repack Ray and transformers smaller (see SLIM)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "distrib_bundle_cache",
        help="download cache outside the repo (default: %(default)s)",
    )
    a = p.parse_args(argv)
    try:
        for path in [a.have, *(a.constraints or [])]:
            if not path.is_file():
                raise BundleError(f"{path}: no such file")
        locks = a.constraints or [REPO / "constraints.txt"]
        extras = [e for e in a.extras.split(",") if e]
        with_names = [w for w in a.with_names.split(",") if w]
        skip = [n for n in a.skip.split(",") if n]
        m = build_bundle(a.python, a.out, a.have.read_text(), locks, extras, with_names, a.slim, a.cache, skip)
    except BundleError as e:
        print(f"offline-bundle: {e}", file=sys.stderr)
        return 2
    for r in m["wheels"]:
        print(f"{r['bytes'] / 2**20:8.2f} MiB  {r['wheel']}" + (f"  ({r['note']})" if r["note"] else ""))
    if m["skipped"]:
        print(f"left out (--skip): {', '.join(m['skipped'])}")
    print(f"{m['total_bytes'] / 2**20:8.2f} MiB  total, {len(m['wheels'])} wheels -> {a.out}/ (manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
