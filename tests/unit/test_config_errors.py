"""Bad configuration is a usage error (exit code 4) whose message names the key and the fix."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from unit_support import Project

from pytest_isolate import config as cfg
from pytest_isolate.errors import ConfigError

USAGE = pytest.ExitCode.USAGE_ERROR

MARKED = """
import pytest

@pytest.mark.isolate("fakeenv")
def test_marked():
    pass
"""


def errors(result: pytest.RunResult) -> str:
    return result.stderr.str() + result.stdout.str()


# ---------------------------------------------------------------- markers

BAD_MARKERS = {
    "unknown-env": ('"nosuch"', ["unknown environment 'nosuch'", "known environments:", "fakeenv",
                                 "fakeenv2", "chroot"]),
    "typo-env": ('"fakeenv3"', ["unknown environment 'fakeenv3'", "did you mean 'fakeenv"]),
    "no-args": ("", ["needs one or more environment names", "known: ", "fakeenv"]),
    "non-string": ("42", ["environment names must be strings, got 42"]),
    "bad-kwarg": ('"fakeenv", packages=["x"]', ["'packages' cannot be set here",
                                                "allowed: timeout, reset, network"]),
    "bad-timeout": ('"fakeenv", timeout="soon"', ["key 'timeout' must be a positive number",
                                                  "'soon'"]),
}


def marker_project(project: Project, args: str) -> None:
    project.tests(f"""
        import pytest

        @pytest.mark.isolate({args})
        def test_bad():
            pass

        def test_fine():
            pass
    """)


@pytest.mark.parametrize("case", sorted(BAD_MARKERS))
def test_bad_marker_message(project: Project, case: str) -> None:
    args, needles = BAD_MARKERS[case]
    marker_project(project, args)
    result = project.run_inprocess()
    text = errors(result)
    assert "test_project.py::test_bad: @pytest.mark.isolate" in text
    for needle in needles:
        assert needle in text, (needle, text)
    assert result.ret in (USAGE, pytest.ExitCode.INTERRUPTED)
    result.stdout.no_fnmatch_line("*passed*")  # nothing ran, not even test_fine


@pytest.mark.parametrize("case", sorted(BAD_MARKERS))
def test_bad_marker_exit_code(project: Project, case: str) -> None:
    marker_project(project, BAD_MARKERS[case][0])
    result = project.run_inprocess()
    assert result.ret == USAGE


# ---------------------------------------------------------------- pyproject.toml

BAD_TABLES = {
    "unknown-key": ('pakages = ["gcc"]', ["unknown key 'pakages'", "did you mean 'packages'?",
                                          "known keys:", "[tool.pytest-isolate.envs.bad]"]),
    "wrong-type": ('packages = "gcc"', ["key 'packages' must be a list of strings, got 'gcc'",
                                        "[tool.pytest-isolate.envs.bad]"]),
    "wrong-bool": ('network = "yes"', ["key 'network' must be true or false, got 'yes'"]),
    "unknown-backend": (None, ["unknown backend 'fkae'", "did you mean 'fake'?",
                               "registered backends:", "fake-missing", "chroot"]),
    "arch": ('arch = "sparc"', ["unsupported arch 'sparc'", "supported: amd64, arm64"]),
    "arch-typo": ('arch = "arm46"', ["unsupported arch 'arm46'", "did you mean 'arm64'?"]),
    "release": ('release = "jessie"', ["unsupported release 'jessie'", "supported: buster",
                                       "trixie"]),
    "release-typo": ('release = "bookwrom"', ["did you mean 'bookworm'?"]),
    "negative-timeout": ("timeout = -1", ["key 'timeout' must be a positive number of seconds"]),
    "memory-text": ('memory = "a lot"', ["key 'memory' must be a size such as", "'a lot'"]),
    "memory-small": ('memory = "1M"', ["memory = '1M' is below the minimum of 64M"]),
    "pids-float": ("pids = 100.5", ["key 'pids' must be a whole number >= 16", "100.5"]),
    "cpus-zero": ("cpus = 0", ["key 'cpus' must be a number of CPUs", "got 0"]),
    "package": ('packages = ["gcc make"]', ["'gcc make' is not a Debian package name",
                                            "key 'packages'"]),
    # the fake backend declares no options: only the common ones are checked
    "option-type": ("options = {python = 3}", ["option 'python' must be a string, got 3"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_env_table(project: Project, case: str) -> None:
    line, needles = BAD_TABLES[case]
    table = 'backend = "fkae"' if line is None else f'backend = "fake"\n{line}'
    project.pyproject(f"\n[tool.pytest-isolate.envs.bad]\n{table}\n")
    project.tests(MARKED)
    result = project.run_inprocess()
    assert result.ret == USAGE
    text = result.stderr.str()
    assert str(project.path / "pyproject.toml") in text
    for needle in needles:
        assert needle in text, (needle, text)
    result.stdout.no_fnmatch_line("*passed*")


def test_unknown_top_level_key(project: Project) -> None:
    project.pyproject("\n[tool.pytest-isolate]\ncahce_dir = 'x'\n", base="")
    project.tests(MARKED)
    result = project.run_inprocess()
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["*[[]tool.pytest-isolate[]]: unknown key 'cahce_dir' "
                                 "(did you mean 'cache_dir'?)*"])


def test_env_without_backend(project: Project) -> None:
    project.pyproject("\n[tool.pytest-isolate.envs.nobackend]\nrelease = 'trixie'\n")
    project.tests(MARKED)
    result = project.run_inprocess()
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["*envs.nobackend]: key 'backend' is required; one of: *fake*"])


def test_malformed_pyproject(project: Project) -> None:
    (project.path / "pyproject.toml").write_text("[tool.pytest-isolate.envs.bad\nbackend = 'fake'\n")
    project.tests(MARKED)
    result = project.run_inprocess()
    assert result.ret == USAGE
    text = result.stderr.str()
    assert "pyproject.toml" in text and "line 1" in text, text


def test_malformed_pyproject_message_of_our_loader(tmp_path: Path) -> None:
    # pytest reads pyproject.toml first when it is the ini file; our own loader must say it too
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.pytest-isolate\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml: malformed TOML: .*fix the file's syntax"):
        cfg.load_pyproject(path)


def test_unknown_isolate_env(project: Project) -> None:
    project.tests(MARKED)
    result = project.run_inprocess("--isolate-env", "fakeenv,nosuch")
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["ERROR: --isolate-env: unknown environment 'nosuch'; known environments: *"
                                 "fakeenv, fakeenv2*"])


def test_empty_isolate_env(project: Project) -> None:
    project.tests(MARKED)
    result = project.run_inprocess("--isolate-env", ",")
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["ERROR: --isolate-env: expected one or more environment names, got ','"])


def test_bad_timeout_option(project: Project) -> None:
    project.tests(MARKED)
    result = project.run_inprocess("--isolate-timeout", "0")
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["ERROR: --isolate-timeout: timeout must be a positive number of seconds*"])


@pytest.mark.parametrize(("where", "args", "expected"), [
    ("flag", ("--isolate-warm", "soon"), "ERROR: --isolate-warm: warm must be a number of "
     "seconds (0: off), got 'soon'"),
    ("table", (), "ERROR: *pyproject.toml: [[]tool.pytest-isolate[]] key 'warm': warm must be "
     "a number of seconds (0: off), got -5"),
])
def test_bad_warm_setting(project: Project, where: str, args: tuple[str, ...],
                          expected: str) -> None:
    if where == "table":
        project.pyproject("\n[tool.pytest-isolate]\nwarm = -5\n", base="")
    project.tests(MARKED)
    result = project.run_inprocess(*args)
    assert result.ret == USAGE
    result.stderr.fnmatch_lines([expected])


def test_isolate_env_fixture_unknown_name(project: Project) -> None:
    project.tests("""
        def test_it(isolate_env):
            isolate_env("nosuch")
    """)
    result = project.run_inprocess()
    result.assert_outcomes(errors=0, failed=1)
    result.stdout.fnmatch_lines(["*isolate_env('nosuch'): unknown environment; known: *fakeenv*"])


def cache_dir_under_a_file(project: Project) -> Path:
    blocker = project.path / "not-a-dir"
    blocker.write_text("a regular file")
    return blocker / "cache"


def readonly_cache_dir(project: Project) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root can write to a read-only directory")
    ro = project.path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "cache"


@pytest.mark.parametrize("where", [cache_dir_under_a_file, readonly_cache_dir],
                         ids=["under-a-file", "read-only"])
def test_unwritable_cache_dir_message(project: Project, where: object) -> None:
    path = where(project)  # type: ignore[operator]
    project.tests(MARKED)
    result = project.run_inprocess("--isolate-cache-dir", str(path))
    assert result.ret != pytest.ExitCode.OK
    text = errors(result)
    assert f"--isolate-cache-dir: cache directory {str(path)!r} is not writable" in text, text
    assert "choose another with --isolate-cache-dir or isolate_cache_dir" in text


def test_unwritable_cache_dir_is_a_usage_error(project: Project) -> None:
    path = cache_dir_under_a_file(project)
    project.tests(MARKED)
    result = project.run_inprocess("--isolate-cache-dir", str(path))
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["ERROR: --isolate-cache-dir: cache directory * is not writable*"])


def test_unwritable_cache_dir_does_not_matter_without_isolated_tests(project: Project) -> None:
    path = cache_dir_under_a_file(project)
    project.tests("""
        def test_local():
            pass
    """)
    result = project.run_inprocess("--isolate-cache-dir", str(path))
    result.assert_outcomes(passed=1)


def test_config_error_messages_name_their_source() -> None:
    # precedence and sources, checked on the parsing functions directly
    table = {"envs": {"mine": {"backend": "fake", "release": "bookworm", "packages": ["gcc"]}}}
    specs = cfg.resolve_envs(table, Path("/p/pyproject.toml"), ["fake", "chroot"])
    mine = specs["mine"]
    assert mine.release == "bookworm" and mine.packages == ("gcc",)
    assert mine.source("release") == "/p/pyproject.toml: [tool.pytest-isolate.envs.mine] key 'release'"
    assert mine.source("arch") == "built-in default"
    over = cfg.with_overrides(mine, {"timeout": 5}, "t.py::test: @pytest.mark.isolate")
    assert over.timeout == 5.0 and over.source("timeout") == "t.py::test: @pytest.mark.isolate"
    assert over.rootfs_key() == mine.rootfs_key()  # a timeout does not change what is built
    with pytest.raises(ConfigError, match=r"environment name 'bad name' may only use"):
        cfg.resolve_envs({"envs": {"bad name": {"backend": "fake"}}}, Path("p"), ["fake"])
    with pytest.raises(ConfigError, match=textwrap.dedent(r"unsupported reset 'never'")):
        cfg.with_overrides(mine, {"reset": "never"}, "here")


def test_limits_are_parsed_with_their_units() -> None:
    from pytest_isolate.config import resolve_envs
    from pytest_isolate.limits import DEFAULT_DISK, Limits

    specs = resolve_envs({"envs": {"a": {"backend": "fake", "memory": "1.5G", "disk": "64MiB",
                                         "pids": 100, "cpus": 0.5},
                                   "b": {"backend": "fake", "memory": 134217728}}},
                         Path("pyproject.toml"), ["fake"])
    assert specs["a"].limits() == Limits(memory=3 << 29, cpus=0.5, pids=100, disk=64 << 20)
    assert specs["b"].limits() == Limits(memory=128 << 20, disk=DEFAULT_DISK)
    assert specs["a"].limits().cpu_count() == 1
    # limits are not part of the root filesystem: the same image serves both
    assert specs["a"].rootfs_key() == specs["b"].rootfs_key()


def test_cgroup_values_v1_and_v2() -> None:
    from pytest_isolate.limits import Limits, cgroup_values

    limits = Limits(memory=128 << 20, cpus=1.5, pids=64)
    assert cgroup_values(limits, v2=True, cpus=[0, 1]) == {
        "memory.max": str(128 << 20), "memory.swap.max": "0", "pids.max": "64",
        "cpu.max": "150000 100000", "cpuset.cpus": "0,1"}
    assert cgroup_values(limits, v2=False, cpus=[1]) == {
        "memory.limit_in_bytes": str(128 << 20), "memory.memsw.limit_in_bytes": str(128 << 20),
        "pids.max": "64", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "150000",
        "cpuset.cpus": "1"}
    assert cgroup_values(Limits(), v2=True, cpus=None) == {}


# ---------------------------------------------------------------- typed ini options

@pytest.mark.parametrize(("line", "expected"), [
    ("isolate_strict = maybe", "ini key 'isolate_strict' in *pytest.ini: invalid truth value "
                               "'maybe'; set it to true or false"),
    ("isolate_timeout = soon", "ini key 'isolate_timeout' in *pytest.ini: *'soon'; "
                               "set it to a positive number of seconds"),
])
def test_typed_ini_option_that_does_not_convert(project: Project, line: str,
                                                expected: str) -> None:
    project.pytester.makefile(".ini", pytest=f"[pytest]\n{line}\n")
    project.tests(MARKED)
    result = project.run_inprocess()
    assert result.ret == USAGE
    assert "Traceback" not in errors(result)
    result.stderr.fnmatch_lines([f"*{expected}*"])


def test_typed_ini_options_take_their_values(project: Project) -> None:
    project.pytester.makefile(".ini", pytest="[pytest]\nisolate_strict = yes\n"
                              "isolate_timeout = 2.5\n")
    config = project.pytester.parseconfig()
    assert config.getini("isolate_strict") is True
    assert config.getini("isolate_timeout") == 2.5


def test_python_version_selects_the_debian_release() -> None:
    """python = "X.Y" without an image is the Debian release that ships it (issue 14's
    Python matrix); the built-in pyX.Y environments are such chroots."""
    table = {"envs": {"old": {"backend": "chroot", "python": "3.11"},
                      "both": {"backend": "chroot", "python": "3.13", "release": "trixie"},
                      "img": {"backend": "docker", "python": "3.12", "image": "python:3.12"}}}
    specs = cfg.resolve_envs(table, Path("/p/pyproject.toml"), ["chroot", "docker"])
    assert (specs["old"].release, specs["old"].python_version()) == ("bookworm", "3.11")
    assert "key 'python'" in specs["old"].source("release")
    assert specs["both"].release == "trixie"
    # with an image the version is the image's to prove (checked when it is provisioned)
    assert (specs["img"].release, specs["img"].python_version()) == ("trixie", "3.12")
    assert {n: (s.backend, s.release) for n, s in specs.items() if n.startswith("py")} == {
        "py3.11": ("chroot", "bookworm"), "py3.13": ("chroot", "trixie")}
    assert specs["chroot"].python_version() == "3.13"  # the default release's


@pytest.mark.parametrize(("values", "expected"), [
    ({"python": "3.12"}, "no Debian release that pytest-isolate builds ships Python 3.12 "
                         "(it can: 3.11 (bookworm), 3.13 (trixie)); use one of those, or an "
                         "image that has it: image = \"python:3.12-slim\""),
    ({"python": "3.11", "release": "trixie"},
     "python '3.11' is Debian bookworm's, but /p/pyproject.toml: [tool.pytest-isolate.envs.e] "
     "key 'release' says release 'trixie' (python 3.13); set one of the two keys, not both"),
    ({"python": 3.1}, "key 'python' must be a Python version as a string, such as \"3.13\", "
                      "got the number 3.1; quote it: python = \"3.1\""),
    ({"python": "three"}, "key 'python' must be a Python version as a string"),
    # dockerfile, context, build_args
    ({"context": "."}, "key 'context': 'context' is for building an image from a Dockerfile: "
                       "set 'dockerfile' too, or remove it"),
    ({"build_args": {"A": "1"}}, "'build_args' is for building an image from a Dockerfile"),
    ({"build_args": {"A": 1}, "dockerfile": "D"}, "key 'build_args' must be a table of strings"),
    ({"dockerfile": "D", "image": "debian"}, "key 'dockerfile': an environment has either "
                                             "'dockerfile' or 'image'"),
    ({"dockerfile": "D", "arch": "s390x"}, "key 'arch': arch 's390x' with a 'dockerfile': "
                                           "the engine builds for its own architecture"),
])
def test_bad_python_and_dockerfile_keys(values: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.resolve_envs({"envs": {"e": {"backend": "docker", **values}}},
                         Path("/p/pyproject.toml"), ["docker"])
    assert expected in str(info.value)
    assert str(info.value).startswith("/p/pyproject.toml: [tool.pytest-isolate.envs.e]")


def test_image_on_a_backend_that_cannot_run_one(project: Project) -> None:
    """A backend without supports_images (the fake one here) refuses
    `image` with one message instead of ignoring it."""
    project.pyproject("\n[tool.pytest-isolate.envs.fakeenv]\nbackend = 'fake'\n"
                      "image = 'python:3.12-slim'\n", base="")
    project.tests(MARKED)
    result = project.run()
    text = result.stdout.str() + result.stderr.str()
    assert ("envs.fakeenv] key 'image': backend 'fake' cannot run an image yet (docker, "
            "podman, chroot, lxc, schroot and qemu can)") in text, text
    assert result.ret != 0
