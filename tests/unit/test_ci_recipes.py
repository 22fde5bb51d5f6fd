"""The composite action (action.yml) and the CI recipes in docs/ci/ cannot drift from the CLI.

GitHub and GitLab do not run here, so: every shell script they hold must be valid bash;
the action's steps run under bash the way a runner runs them (inputs through `env:`,
GITHUB_OUTPUT / GITHUB_ENV files), with `pytest-isolate` and `python` replaced by
recorders, and what they would run is parsed by the real argparse parser; the recipes'
`pytest-isolate ...` lines parse there too, and their `--isolate-*` flags are the plugin's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

import pytest_isolate
from pytest_isolate import cli
from pytest_isolate.cli.setup import cmd_setup

REPO = Path(__file__).resolve().parents[2]
ACTION = REPO / "action.yml"
DOCS = REPO / "docs" / "ci"
GITHUB_RECIPES = ("github-actions.yml", "github-actions-long.yml")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
PACKAGE_PARENT = str(Path(pytest_isolate.__file__).resolve().parents[1])

# a stand-in for a command: appends its arguments, as one JSON line, to a log
RECORDER = """#!{python}
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def action() -> dict[str, Any]:
    return load(ACTION)


def action_inputs() -> dict[str, str]:
    return {name: str(spec.get("default", "")) for name, spec in action()["inputs"].items()}


def action_step(name: str) -> dict[str, Any]:
    [step] = [s for s in action()["runs"]["steps"] if s.get("name") == name]
    assert isinstance(step, dict)
    return step


def workflow_scripts(path: Path) -> Iterator[str]:
    """Every `run:` of a workflow's jobs, or of GitLab jobs' before/script/after lists."""
    for job in load(path).get("jobs", {}).values():
        for step in job.get("steps", []):
            if "run" in step:
                yield step["run"]
    if path.name.startswith("gitlab"):
        for job in load(path).values():
            if isinstance(job, dict) and "script" in job:
                for key in ("before_script", "script", "after_script"):
                    yield "\n".join(job.get(key, []))


def without_expressions(script: str) -> str:
    """GitHub substitutes ${{ ... }} before bash sees the script: a plain word stands in."""
    return EXPRESSION.sub("EXPRESSION", script)


def bash_syntax_error(script: str) -> str | None:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True,
                            timeout=60)
    return None if result.returncode == 0 else result.stderr


def cli_invocations(script: str) -> list[list[str]]:
    """The arguments of every `pytest-isolate ...` command in a script (not pytest-isolate-env)."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        for match in re.finditer(r"(?:^|[\s;&|(])pytest-isolate\s+([^;&|)]*)", line):
            found.append(shlex.split(match.group(1), comments=True))
    return found


def parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """argv through the real parser; a subcommand or option it does not know fails the test."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`pytest-isolate {shlex.join(argv)}` does not parse: {capsys.readouterr().err}")


def run_step(step: dict[str, Any], inputs: dict[str, str], tmp_path: Path, bindir: Path,
             cwd: Path | None = None) -> dict[str, str]:
    """The step's script as a runner runs `shell: bash`, its `env:` evaluated with these
    inputs over the defaults; returns what it wrote to GITHUB_OUTPUT."""
    values = {**action_inputs(), **inputs}

    def evaluate(match: re.Match[str]) -> str:
        kind, _, name = match.group(1).partition(".")
        assert kind == "inputs" and name in values, f"unknown expression {match.group(0)}"
        return values[name]

    files = {name: tmp_path / name for name in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH")}
    for file in files.values():
        file.write_text("")
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    env = {**os.environ, **{k: EXPRESSION.sub(evaluate, str(v)) for k, v in step.get("env", {}).items()},
           **{k: str(v) for k, v in files.items()},
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "RUNNER_OS": "Linux",
           "RUNNER_ARCH": "X64", "RUNNER_TEMP": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                            cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = files["GITHUB_OUTPUT"].read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def recorder(bindir: Path, command: str) -> Path:
    log = bindir.parent / f"{command}.log"
    bindir.mkdir(exist_ok=True)
    (bindir / command).write_text(RECORDER.format(python=sys.executable, log=str(log)))
    (bindir / command).chmod(0o755)
    return log


def recorded(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# ------------------------------------------------------------------ the action


def test_action_scripts_are_bash_and_take_inputs_through_env() -> None:
    """A value spliced into a script would be shell code; through env: it stays data."""
    data = action()
    assert data["runs"]["using"] == "composite"
    ids = {s["id"] for s in data["runs"]["steps"] if "id" in s}
    inputs = set(data["inputs"])
    scripts = 0
    for step in data["runs"]["steps"]:
        if "run" in step:
            scripts += 1
            assert step.get("shell") == "bash", step["name"]
            assert "${{" not in step["run"], f"{step['name']}: an expression inside run:"
            assert bash_syntax_error(step["run"]) is None, (step["name"], step["run"])
    assert scripts >= 4
    for expression in EXPRESSION.findall(ACTION.read_text()):
        for ref in re.findall(r"\b(inputs|steps)\.([\w-]+)", expression):
            assert ref[1] in (inputs if ref[0] == "inputs" else ids), expression


@pytest.mark.parametrize(("inputs", "expected"), [
    ({}, ["setup"]),
    ({"envs": "chroot,docker"}, ["setup", "--envs", "chroot,docker"]),
    ({"backends": "all", "arches": "arm64,armhf"},
     ["setup", "--backends", "all", "--arches", "arm64,armhf"]),
    ({"envs": "my env", "backends": "qemu", "arches": "arm64"},
     ["setup", "--envs", "my env", "--backends", "qemu", "--arches", "arm64"]),
])
def test_action_setup_step_is_a_real_setup_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], inputs: dict[str, str],
        expected: list[str]) -> None:
    bindir = tmp_path / "bin"
    log = recorder(bindir, "pytest-isolate")
    run_step(action_step("pytest-isolate setup"), inputs, tmp_path, bindir)
    [argv] = recorded(log)
    assert argv == expected
    args = parse(argv, capsys)
    assert args.handler is cmd_setup
    assert (args.envs, args.backends, args.arches) == (
        inputs.get("envs"), inputs.get("backends"), inputs.get("arches"))


@pytest.mark.parametrize(("extras", "version", "pip_install", "expected"), [
    ("", "", "", ["pytest-isolate-env"]),
    ("all", "0.2.0", "", ["pytest-isolate-env[all]==0.2.0"]),
    ("docker,completion", ">=0.2,<0.3", "-e .[test] pytest-xdist",
     ["pytest-isolate-env[docker,completion]>=0.2,<0.3", "-e", ".[test]", "pytest-xdist"]),
])
def test_action_pip_step(tmp_path: Path, extras: str, version: str, pip_install: str,
                         expected: list[str]) -> None:
    bindir = tmp_path / "bin"
    log = recorder(bindir, "python")
    run_step(action_step("pip install pytest-isolate-env"),
             {"extras": extras, "version": version, "pip-install": pip_install}, tmp_path, bindir)
    assert recorded(log) == [["-m", "pip", "install", "--upgrade", "pip", *expected]]
    # every extra the action's description names is one the package declares
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                   ["project"]["optional-dependencies"])
    assert set(re.findall(r"`(\w+)`", action()["inputs"]["extras"]["description"])) <= declared


def test_action_cache_key_follows_the_isolate_tables(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # this Python, with its environment's packages (a symlink would lose its venv)
    (bindir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bindir / "python").chmod(0o755)
    project = tmp_path / "proj"
    project.mkdir()
    pyproject = project / "pyproject.toml"
    step = action_step("the cache key")

    def keys(text: str | None, **inputs: str) -> tuple[str, str]:
        if text is None:
            pyproject.unlink(missing_ok=True)
        else:
            pyproject.write_text(text)
        out = run_step(step, inputs, tmp_path, bindir, cwd=project)
        assert out["key"].startswith(out["restore-key"]), out
        return out["key"], out["restore-key"]

    isolate = "[tool.pytest-isolate.envs.arm]\nbackend = 'chroot'\narch = 'arm64'\n"
    key, prefix = keys("[project]\nname = 'demo'\nversion = '1'\n" + isolate, envs="chroot,arm")
    assert prefix.startswith("pytest-isolate-Linux-X64-chroot_arm-")
    # another version of the project: the root filesystems are restored, saved under a new key
    key2, prefix2 = keys("[project]\nname = 'demo'\nversion = '2'\n" + isolate, envs="chroot,arm")
    assert prefix2 == prefix and key2 != key
    # another environment table: nothing of the old one is restored
    _, prefix3 = keys("[project]\nname = 'demo'\nversion = '2'\n" + isolate.replace("arm64", "armhf"),
                      envs="chroot,arm")
    assert prefix3 != prefix
    # no pyproject.toml (pytest.ini projects) and no envs input: keyed all the same
    _, prefix4 = keys(None)
    assert prefix4.startswith("pytest-isolate-Linux-X64-project-")
    assert keys(None, backends="all")[1].startswith("pytest-isolate-Linux-X64-all-")


def test_action_exports_the_cache_dir(tmp_path: Path) -> None:
    step = action_step("the cache directory, for this job's later steps")
    run_step(step, {"cache-dir": "/srv/isolate cache"}, tmp_path, tmp_path)
    assert (tmp_path / "GITHUB_ENV").read_text() == "PYTEST_ISOLATE_CACHE_DIR=/srv/isolate cache\n"


# ------------------------------------------------------------------ the recipes in docs/ci


def test_github_recipe_uses_the_action_with_its_inputs() -> None:
    steps = [s for job in load(DOCS / "github-actions.yml")["jobs"].values() for s in job["steps"]]
    [step] = [s for s in steps if re.fullmatch(r"[\w.-]+/pytest-isolate@[\w.-]+", s.get("uses", ""))]
    assert set(step["with"]) <= set(action_inputs()), step["with"]
    assert step["with"]["envs"] == "${{ matrix.env }}"


@pytest.mark.parametrize("name", [*GITHUB_RECIPES, "gitlab-ci.yml"])
def test_recipe_scripts_are_bash(name: str) -> None:
    scripts = list(workflow_scripts(DOCS / name))
    assert scripts
    for script in scripts:
        assert bash_syntax_error(without_expressions(script)) is None, script


@pytest.mark.parametrize("name", ["github-actions-long.yml", "gitlab-ci.yml"])
def test_recipe_cli_calls_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    calls = [argv for script in workflow_scripts(DOCS / name)
             for argv in cli_invocations(without_expressions(script))]
    assert [argv[0] for argv in calls] == ["setup"]
    for argv in calls:
        assert parse(argv, capsys).handler is cmd_setup


def test_recipe_pytest_flags_are_the_plugins(tmp_path: Path) -> None:
    used = {flag for name in (*GITHUB_RECIPES, "gitlab-ci.yml")
            for script in workflow_scripts(DOCS / name)
            for flag in re.findall(r"--isolate-[a-z-]+", script)}
    assert {"--isolate-env", "--isolate-strict", "--isolate-report"} <= used
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    known = set(re.findall(r"--isolate-[a-z-]+", result.stdout))
    assert used <= known, used - known
