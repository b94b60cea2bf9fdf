"""The docs: the site builds in strict mode, the generated reference pages match the code, and every
`distrib` / `make` / `accelerate launch` command line in README.md and docs/ parses, names files that exist,
resolves its config files and overrides, and (the cheap ones: --help, --version, shard inspect) runs; any
other kind of shell line is named with the reason it is not run here."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from distrib import errors
from distrib.cli import _parse, build_parser
from distrib.cli.reference import CASCADE_TABLES, RECIPE_TABLES, REGENERATE, stale_pages
from distrib.config import schema

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
DISTRIB = str(Path(sys.executable).parent / "distrib")
ROOT_FILES = {p.name for p in REPO.iterdir() if p.is_file()}
REPO_DIRS = ("launch/", "src/", "tests/", "docs/", "shards/", "tune/")
PLACEHOLDER = re.compile(r"^(\.\.\.|…)$|[A-Z]{3,}")  # CONFIG, RUN_DIR, HEAD_IP, ...: the reader fills them in


def _shell_lines(path: Path) -> list[tuple[str, list[str]]]:
    """(block language, words) of each command line in the file's fenced code blocks (not yaml, mermaid or
    python ones), backslash continuations joined, environment assignments and trailing comments removed."""
    lines, block, lang = [], None, ""
    for raw in path.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)", raw)
        if fence:
            block, lang = (None, "") if block is not None else ([], fence.group(1))
            continue
        if block is None or lang in ("yaml", "mermaid", "python"):
            continue
        if block and block[-1].endswith("\\"):
            block[-1] = block[-1][:-1] + " " + raw.strip()
        else:
            block.append(raw.strip())
        if not raw.rstrip().endswith("\\"):
            line = re.sub(r"\s+#.*$", "", block.pop()).strip()
            words = shlex.split(line) if line and not line.startswith("#") else []
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words.pop(0)
            if words:
                lines.append((lang, words))
    return lines


def _is_command(words: list[str]) -> bool:
    return words[0] in ("distrib", "make") or words[:2] == ["accelerate", "launch"]


LINES = [(p.relative_to(REPO).as_posix(), lang, words) for p in DOCS for lang, words in _shell_lines(p)]
COMMANDS = sorted({(page, shlex.join(w)) for page, _, w in LINES if _is_command(w)})
# The other shell lines the docs show, by their first words, and why this suite does not run them.
NOT_RUN_HERE = {
    ("source",): "activates the venv; nothing to check",
    ("ray", "start"): "starts a Ray node of a multi-machine cluster",
    ("python3.11", "-m", "venv"): "creates a virtual environment (minutes)",
    ("python", "-m"): "checked by test_doc_python_lines: the module exists",
    ("pip", "install"): "installs into the reader's environment; make resolve checks that it resolves",
    ("pip", "check"): "reads the reader's own environment",
    ("scripts/gpu_check.sh",): "the offline GPU node's check (minutes, needs a bundle); test_offline_bundle.py "
    "covers its report",
}


def _check_paths(words: list[str], where: str) -> None:
    for w in words:
        for part in [w, *w.split("=", 1)[1:]]:
            if PLACEHOLDER.search(part) or "*" in part:
                continue
            if part.startswith(REPO_DIRS) or (part in ROOT_FILES and "." in part):
                assert (REPO / part).exists(), f"{where}: names {part}, which is not in the repo"


def _check_distrib(argv: list[str], where: str) -> None:
    if argv[:2] == ["shard", "inspect"]:  # the CLI's own alias (cli.main)
        argv = ["shard-inspect", *argv[2:]]
    try:
        _parse(build_parser(), argv)
    except SystemExit as e:  # --help / --version exit 0 after printing
        if e.code != 0:
            pytest.fail(f"{where}: `distrib {shlex.join(argv)}` does not parse with build_parser()")
    _check_paths(argv, where)


def test_docs_have_commands():
    """The extraction finds the commands (an empty list would make the next test pass vacuously)."""
    found = {c.split()[0] for _, c in COMMANDS} | {" ".join(c.split()[:2]) for _, c in COMMANDS}
    assert {"distrib", "make", "accelerate launch"} <= found
    assert any(f == "README.md" for f, _ in COMMANDS)


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{f}:{c[:60]}" for f, c in COMMANDS])
def test_doc_command_parses(page, line):
    words = shlex.split(line)
    where = f"{page}: `{line}`"
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        for t in [w for w in words[1:] if "=" not in w]:
            assert t in targets, f"{where}: no Makefile target '{t}'"
    elif words[0] == "distrib":
        _check_distrib(words[1:], where)
    else:
        from accelerate.commands.launch import launch_command_parser

        try:
            args = launch_command_parser().parse_args(words[2:])
        except SystemExit:
            pytest.fail(f"{where}: accelerate's launch parser refuses it")
        _check_paths([w for w in words[2:] if not w.startswith("-")][:1] + words[2:], where)
        if args.module:
            assert args.training_script == "distrib", where
            _check_distrib(args.training_script_args, where)
        else:
            assert args.training_script == "launch/train.py", f"{where}: trains through launch/train.py"
            _check_distrib(["train", *args.training_script_args], where)


def test_doc_commands_help_runs(tmp_path):
    """`distrib SUBCOMMAND --help` runs for real for every subcommand the docs use, and so does each doc
    line that is itself a `--help` or `--version` line, as written."""
    subs = sorted({shlex.split(c)[1] for _, c in COMMANDS if c.startswith("distrib ") and shlex.split(c)[1][0] != "-"})
    assert len(subs) >= 8, subs
    env = subprocess_env(tmp_path)
    for sub in subs:
        r = subprocess.run([DISTRIB, sub, "--help"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and "usage: distrib" in r.stdout, (sub, r.stderr[-500:])
    cheap = [(p, c) for p, c in COMMANDS if c.startswith("distrib ") and {"--help", "--version"} & set(c.split())]
    assert any("--version" in c for _, c in cheap) and any("--help" in c for _, c in cheap), cheap
    for page, line in cheap:
        r = subprocess.run([DISTRIB, *shlex.split(line)[1:]], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), f"{page}: `{line}` failed: {r.stderr[-500:]}"
        if "--help" in line:
            assert "config keys, KEY=DEFAULT" in r.stdout, f"{page}: `{line}` lists no config keys"


def test_every_doc_shell_line_is_checked():
    """A shell line in the docs is a checked command (distrib, make, accelerate launch) or a kind named
    in NOT_RUN_HERE with its reason, so a new kind of command cannot slip in unchecked."""
    other = [(page, w) for page, lang, w in LINES if lang in ("bash", "sh", "shell", "console") and not _is_command(w)]
    unknown = [
        f"{page}: {shlex.join(w)}" for page, w in other if not any(tuple(w[: len(k)]) == k for k in NOT_RUN_HERE)
    ]
    assert not unknown, "doc command lines no test checks (check them here or add to NOT_RUN_HERE):\n" + "\n".join(
        unknown
    )


def test_doc_python_lines():
    """`python -m MODULE` lines name a module that exists."""
    mods = [(page, w[2]) for page, _, w in LINES if w[:2] == ["python", "-m"]]
    assert mods
    for page, mod in mods:
        assert importlib.util.find_spec(mod) is not None, f"{page}: `python -m {mod}`: no such module"


def _doc_argv(words: list[str]) -> tuple[list[str], str | None]:
    """The distrib argv a doc line runs (an `accelerate launch` line runs `distrib train`) and its
    accelerate config file, if any."""
    if words[0] == "distrib":
        argv = words[1:]
        return (["shard-inspect", *argv[2:]] if argv[:2] == ["shard", "inspect"] else argv), None
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(words[2:])
    argv = args.training_script_args if args.module else ["train", *args.training_script_args]
    return argv, args.config_file


def _real(path: str | None) -> bool:
    return bool(path) and not PLACEHOLDER.search(path)


VALIDATED = [(p, c) for p, c in COMMANDS if c.split()[0] != "make" and not {"--help", "--version"} & set(c.split())]


@pytest.mark.parametrize(("page", "line"), VALIDATED, ids=[f"{f}:{c[:60]}" for f, c in VALIDATED])
def test_doc_command_configs_resolve(page, line):
    """Validation only, in-process: the config files and dotted overrides each doc line names resolve
    and validate (experiment, grid, recipe with each of its experiments, cascade, accelerate config)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from distrib.cascade.config import load_cascade_config
    from distrib.config import load_config
    from distrib.recipes.config import load_recipe
    from distrib.sweep.grid import load_grid

    argv, accelerate_config = _doc_argv(shlex.split(line))
    where = f"{page}: `{line}`"
    if accelerate_config is not None:
        assert _real(accelerate_config) and (REPO / accelerate_config).is_file(), f"{where}: no {accelerate_config}"
        assert load_config_from_file(str(REPO / accelerate_config)).distributed_type, where
    a = _parse(build_parser(), argv)
    overrides = [o for o in getattr(a, "overrides", []) if not PLACEHOLDER.search(o)]
    if a.command in ("train", "tune") and _real(a.config):
        flags = {"tune.search": getattr(a, "search", None), "tune.num_samples": getattr(a, "num_samples", None)}
        load_config(REPO / a.config, [*overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)])
        if getattr(a, "grid", None) and _real(a.grid):
            assert load_grid(REPO / a.grid), where
    elif a.command == "run":
        recipe = load_recipe(REPO / a.recipe, overrides)
        experiments = [(recipe.stage1.experiment, recipe.stage1.overrides)] if recipe.stage1.experiment else []
        for e in recipe.experts:
            experiments.append((e.experiment, e.overrides))
            assert not e.grid or load_grid(e.grid), where
        assert experiments, where
        for experiment, own in experiments:
            load_config(experiment, [*recipe.overrides, *own])
    elif a.command == "cascade":
        assert load_cascade_config(REPO / a.config).stage1.run, where
    elif a.command in ("embed", "stack", "thresholds", "export"):
        load_config(getattr(a, "config", None), overrides)


def test_doc_shard_inspect_runs(demo_shards, tmp_path):
    """The docs' `distrib shard inspect DIR` runs for real, on real test shards."""
    lines = [c for _, c in COMMANDS if c.startswith("distrib shard inspect")]
    assert lines
    argv = shlex.split(lines[0])[1:-1] + [str(demo_shards)]
    r = subprocess.run([DISTRIB, *argv], capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert "sha256" in r.stdout


def test_reference_pages_current():
    stale = stale_pages(REPO / "docs" / "reference")
    assert not stale, f"docs/reference/{', '.join(stale)} out of date; regenerate with: {REGENERATE}"


def test_every_config_key_documented_in_config_page():
    """Every key of experiment, recipe and cascade files carries its one-line doc in the field's metadata
    (the one source for the page, --help and the error messages) and appears on the config page with it."""
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    tables = [("", schema.ExperimentConfig), *schema.SECTIONS.items(), *RECIPE_TABLES, *CASCADE_TABLES]
    assert len(tables) >= 20
    for section, cls in tables:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue  # a sub-section: its own table
            key = f"{section}.{f.name}" if section else f.name
            doc = f.metadata.get("doc")
            assert doc, f"{cls.__name__}.{f.name} ({key}) has no field(metadata={{'doc': ...}})"
            assert f"| `{key}` |" in page, f"{key} missing from docs/reference/config.md"
            assert doc.replace("|", "\\|") in page, f"{key}'s doc is not on docs/reference/config.md"


def test_troubleshooting_names_every_error_class():
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    classes = [n for n, v in vars(errors).items() if isinstance(v, type) and v.__module__ == errors.__name__]
    assert len(classes) >= 4
    for name in classes:
        assert f"`{name}`" in page, f"docs/troubleshooting.md does not explain {name}"


def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_readme_short_and_cpu_command_early():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    first = next(i for i, s in enumerate(lines) if s.startswith("distrib run launch/recipes/demo.yaml"))
    assert first < 80, f"the CPU own-data command is at line {first + 1}"


LAB_NOTES = re.compile(r"PITFALLS|not bisected|was lent|issue [0-9]+")


def test_no_lab_notes_in_code_or_docs():
    """Docstrings, comments and pages say why, for users: no pointers to issue numbers, lab-notebook
    phrases or files the project does not have (the grep the docs guide asks to stay empty)."""
    files = [REPO / "README.md"]
    for d in ("src", "docs"):
        files += [p for p in sorted((REPO / d).rglob("*")) if p.is_file() and p.suffix != ".pyc"]
    hits = []
    for p in files:
        try:
            text = p.read_text()
        except UnicodeDecodeError:  # images
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if LAB_NOTES.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert len(files) > 50
    assert not hits, "lab notes in user-facing text (move figures to docs/performance-notes.md):\n" + "\n".join(hits)
