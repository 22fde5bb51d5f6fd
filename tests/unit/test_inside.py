"""What pytest inside is told (pytest_isolate/inside.py) and the dependency keys' checks.

Pure functions and configuration only: no backend, no agent.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from unit_support import Project

from pytest_isolate.config import load_pyproject, resolve_envs
from pytest_isolate.errors import ConfigError
from pytest_isolate.images.deps import make_plan, resolve_groups
from pytest_isolate.inside import disabled_plugins, filter_addopts, initial_paths
from pytest_isolate.spec import EnvSpec


@pytest.mark.parametrize(("addopts", "kept", "dropped"), [
    (["-ra", "--strict-markers"], ["--strict-markers"], ["-ra"]),
    (["-n", "4", "--dist", "loadfile", "-x"], [], ["-n", "4", "--dist", "loadfile", "-x"]),
    (["-n4", "--doctest-modules"], ["--doctest-modules"], ["-n4"]),
    (["--cov=pkg", "--cov-report", "term", "-p", "pytester"],
     ["-p", "pytester"], ["--cov=pkg", "--cov-report", "term"]),
    (["-p", "xdist", "-pno:randomly"], ["-pno:randomly"], ["-p", "xdist"]),
    (["--isolate-env", "chroot", "--isolate-strict", "-W", "error"],
     ["-W", "error"], ["--isolate-env", "chroot", "--isolate-strict"]),
    (["--junitxml=out.xml", "-v", "--tb", "short", "--import-mode=importlib"], [],
     ["--junitxml=out.xml", "-v", "--tb", "short", "--import-mode=importlib"]),
    (["--reruns", "2", "--lf", "--timeout=5", "--import-mode", "append"], [],
     ["--reruns", "2", "--lf", "--timeout=5", "--import-mode", "append"]),
    (["-W", "error", "--timeout", "5", "-k", "x"], ["-W", "error", "-k", "x"], ["--timeout", "5"]),
])
def test_filter_addopts(addopts: list[str], kept: list[str], dropped: list[str]) -> None:
    assert filter_addopts(addopts) == (kept, dropped)


def test_disabled_plugins_come_from_the_command_line() -> None:
    args = ["-p", "no:randomly", "-pno:warnings", "-p", "myplugin", "-p", "no:cacheprovider"]
    assert disabled_plugins(args) == ["-p", "no:randomly", "-p", "no:warnings"]


def specs(tmp_path: Path, text: str) -> dict[str, EnvSpec]:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    return resolve_envs(load_pyproject(path), path, ["chroot", "docker", "qemu", "lxc", "schroot"])


def test_a_deferred_pytest_configures_from_the_hosts_paths_in_the_project(
        tmp_path: Path) -> None:
    """initial_paths: the host's arguments made absolute (their node ids kept); those
    outside the project or missing are left out, and the project's root stands in for
    none.  (A stand-in for pytest's Config: the three attributes it reads.)"""
    root = tmp_path / "project"
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "test_a.py").write_text("")
    (tmp_path / "elsewhere.py").write_text("")

    def config(invoked: Path, *args: str) -> SimpleNamespace:
        return SimpleNamespace(rootpath=root, args=list(args),
                               invocation_params=SimpleNamespace(dir=invoked))

    assert initial_paths(config(root / "tests", "test_a.py::test_x", "../tests", "gone.py",
                                "../../elsewhere.py")) == [
        f"{root}/tests/test_a.py::test_x", f"{root}/tests"]
    assert initial_paths(config(root, "tests/test_a.py")) == [f"{root}/tests/test_a.py"]
    assert initial_paths(config(tmp_path, "elsewhere.py")) == [str(root)]
    assert initial_paths(config(root)) == [str(root)]


def test_top_level_keys_are_defaults_for_every_environment(tmp_path: Path) -> None:
    got = specs(tmp_path, '[tool.pytest-isolate]\nextras = ["tests"]\ndeps = ["a"]\n'
                          '[tool.pytest-isolate.envs.other]\nbackend = "chroot"\ndeps = ["b"]\n')
    chroot, other = got["chroot"], got["other"]
    assert chroot.extras == ("tests",) and chroot.deps == ("a",)
    assert other.extras == ("tests",) and other.deps == ("b",)
    assert "[tool.pytest-isolate.envs.other] key 'deps'" in other.source("deps")
    assert "[tool.pytest-isolate] key 'extras'" in other.source("extras")


@pytest.mark.parametrize(("text", "message"), [
    ('[tool.pytest-isolate]\npackage = "develop"\n', "unsupported package 'develop'"),
    ('[tool.pytest-isolate]\ndeps = "attrs"\n', "key 'deps' must be a list of strings"),
    ('[tool.pytest-isolate.envs.x]\nbackend = "chroot"\npackage = "wheels"\n',
     "(did you mean 'wheel'?)"),
])
def test_bad_dependency_keys(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        specs(tmp_path, text)
    assert message in str(info.value)
    assert str(tmp_path / "pyproject.toml") in str(info.value)


def test_dependency_groups_follow_includes() -> None:
    data = {"dependency-groups": {"test": ["pytest-mock", {"include-group": "Typing"}],
                                  "typing": ["mypy>=1"]}}
    assert resolve_groups(data, ("test",), "here") == ["pytest-mock", "mypy>=1"]
    with pytest.raises(ConfigError, match=r"no dependency group 'docs'.*its groups: test, typing"):
        resolve_groups(data, ("docs",), "here")
    loop = {"dependency-groups": {"a": [{"include-group": "b"}], "b": [{"include-group": "a"}]}}
    with pytest.raises(ConfigError, match="includes itself"):
        resolve_groups(loop, ("a",), "here")


def test_plan_defaults_and_key_inputs(tmp_path: Path) -> None:
    got = specs(tmp_path, '[project]\nname = "p"\nversion = "0"\n'
                          '[tool.pytest-isolate]\ndeps = ["-r req.txt"]\n')
    (tmp_path / "req.txt").write_text("-c constraints.txt\nattrs\n")
    (tmp_path / "constraints.txt").write_text("attrs<99\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "fast.c").write_text("int x;\n")
    (tmp_path / "src" / "slow.py").write_text("x = 1\n")
    plan = make_plan(got["chroot"], tmp_path)
    assert plan is not None
    assert plan.package == "editable"  # a [project] table: editable by default
    assert plan.requirements == (f"-r {tmp_path / 'req.txt'}",)
    # requirement files (and what they name), build files and extension sources are inputs;
    # a .py is not (an editable install sees it as it is)
    assert set(plan.files) == {str(tmp_path / "req.txt"), str(tmp_path / "constraints.txt"),
                               "pyproject.toml", "src/fast.c"}
    assert plan.lines(tmp_path)[-1] == f"-e {tmp_path}"


def test_nothing_to_install_is_no_layer(tmp_path: Path) -> None:
    got = specs(tmp_path, "[tool.pytest.ini_options]\n")
    assert make_plan(got["chroot"], tmp_path) is None
    got = specs(tmp_path, '[tool.pytest-isolate]\nextras = ["x"]\n')
    with pytest.raises(ConfigError, match="extras need the project installed"):
        make_plan(got["chroot"], tmp_path)


# ---------------------------------------------------------------- at collection, with the fake backend

@pytest.mark.parametrize(("extra", "message"), [
    ('[tool.pytest-isolate]\nextras = ["tests"]\n', "extras need the project installed"),
    ('[tool.pytest-isolate]\ndeps = ["-r requirements-missing.txt"]\n',
     "'-r requirements-missing.txt': no file"),
])
def test_bad_dependency_keys_stop_the_run_before_any_test(project: Project, extra: str,
                                                          message: str) -> None:
    """The fake backend (registered through the real hook) is never started: the keys are
    checked once collection has bound items to environments."""
    project.pyproject(extra)
    project.tests('import pytest\n\n@pytest.mark.isolate("fakeenv")\ndef test_a():\n    pass\n\n'
                  '@pytest.mark.isolate("fakeenv")\ndef test_b():\n    pass\n')
    result = project.run_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stderr.str() + result.stdout.str()
    assert text.count(message) == 1, text
    assert "[tool.pytest-isolate] key" in text, text
    assert "test_a" not in result.stdout.str(), text  # nothing ran
