"""Configuration resolution in-process: built-in environments, the merge of the pyproject
tables with their sources, overrides, and the wording of every configuration error
(which names the key, the value, the file and the fix).  Golden files: golden/config_*."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from pure_support import Golden

from pytest_isolate import config
from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.errors import ConfigError
from pytest_isolate.spec import EnvSpec, host_arch

PYPROJECT = Path("/project/pyproject.toml")
BACKENDS = sorted(BUILTIN_BACKENDS)


def render(specs: Mapping[str, EnvSpec], names: list[str] | None = None) -> str:
    """Every field of each spec with where it came from; the architecture an environment
    takes from the host is written <host>, so the file is the same on every machine."""
    lines = []
    for name in names or sorted(specs):
        spec = specs[name]
        lines.append(f"[{name}]")
        for field in dataclasses.fields(EnvSpec):
            if field.name in ("name", "layer", "sources"):
                continue
            value: Any = getattr(spec, field.name)
            if field.name == "arch" and "arch" not in spec.sources:
                value = "<host>"
            source = spec.sources.get(field.name)
            lines.append(f"{field.name} = {value!r}" + (f"  # {source}" if source else ""))
        lines.append(f"rootfs_key = {spec.rootfs_key() if 'arch' in spec.sources else '<host>'}")
        lines.append("")
    return "\n".join(lines)


def test_builtin_environments(golden: Golden) -> None:
    specs = config.resolve_envs({}, None, BACKENDS)
    assert sorted(specs) == sorted({*config.BUILTIN_ENVS, *config.PYTHON_ENVS})
    assert specs["docker"].arch == host_arch()
    assert specs["arm64_vm"].arch == "arm64"
    golden.check("config_builtin.txt", render(specs))


MERGED_TABLE: dict[str, Any] = {
    "package": "wheel",
    "deps": ["pytest-mock"],
    "envs": {
        "docker": {"image": "python:3.12-slim", "timeout": 30, "memory": "1G"},
        "old": {"backend": "chroot", "python": "3.11", "packages": ["git", "libfoo1:arm64"],
                "arch": "arm64", "pass_env": ["CI"]},
        "vm": {"backend": "qemu", "arch": "amd64", "options": {"accel": "tcg"}, "cpus": 2,
               "reset": "module", "package": "skip"},
        "built": {"backend": "docker", "dockerfile": "ci/Dockerfile",
                  "build_args": {"B": "2", "A": "1"}},
    },
}


def test_pyproject_tables_merge_over_the_builtins(golden: Golden) -> None:
    specs = config.resolve_envs(MERGED_TABLE, PYPROJECT, BACKENDS)
    docker, old, vm = specs["docker"], specs["old"], specs["vm"]
    assert (docker.backend, docker.image, docker.timeout) == ("docker", "python:3.12-slim", 30.0)
    assert docker.package == "wheel" and docker.deps == ("pytest-mock",)
    assert old.release == "bookworm"  # python 3.11 is bookworm's
    assert vm.package == "skip"  # the environment's own table beats the top level
    assert specs["built"].build_args == (("A", "1"), ("B", "2"))
    assert specs["chroot"].package == "wheel"  # top-level deps keys reach the built-ins too
    golden.check("config_merged.txt",
                 render(specs, ["docker", "old", "vm", "built", "chroot", "py3.13"]))


def test_overrides_replace_a_value_and_its_source() -> None:
    spec = config.resolve_envs(MERGED_TABLE, PYPROJECT, BACKENDS)["docker"]
    changed = config.with_overrides(spec, {"timeout": 5, "reset": "session"},
                                    "marker on test_x.py::test_y")
    assert (changed.timeout, changed.reset) == (5.0, "session")
    assert changed.source("timeout") == "marker on test_x.py::test_y"
    assert spec.timeout == 30.0 and changed.image == spec.image
    assert config.with_overrides(spec, {}, "anywhere") is spec


def env(**values: Any) -> dict[str, Any]:
    return {"envs": {"e": values}}


def resolve(table: dict[str, Any]) -> Callable[[], object]:
    return lambda: config.resolve_envs(table, PYPROJECT, BACKENDS)


def docker_spec() -> EnvSpec:
    return config.resolve_envs({}, PYPROJECT, BACKENDS)["docker"]


ACCEL = {"accel": config.Option("a string", "the accelerator", ("kvm", "tcg"))}


def with_options(**options: Any) -> EnvSpec:
    return config.resolve_envs(env(backend="docker", options=options), PYPROJECT, BACKENDS)["e"]


#: case -> (what raises ConfigError, words its message must contain)
ERRORS: dict[str, tuple[Callable[[], object], tuple[str, ...]]] = {
    "unknown env key": (resolve(env(backend="chroot", pakages=["git"])),
                        ("[tool.pytest-isolate.envs.e]", "'pakages'", "did you mean 'packages'")),
    "wrong type": (resolve(env(backend="chroot", network="yes")),
                   ("[tool.pytest-isolate.envs.e]", "'network'", "true or false", "'yes'")),
    "python as a number": (resolve(env(backend="chroot", python=3.1)),
                           ("'python'", "3.1", 'python = "3.1"')),
    "python no release ships": (resolve(env(backend="chroot", python="3.12")),
                                ("key 'python'", "3.12", "image = \"python:3.12-slim\"")),
    "python against release": (resolve(env(backend="chroot", python="3.11", release="trixie")),
                               ("'3.11'", "key 'release'", "'trixie'", "not both")),
    "unknown backend": (resolve(env(backend="dokcer")),
                        ("key 'backend'", "'dokcer'", "did you mean 'docker'", "chroot")),
    "missing backend": (resolve(env(release="bookworm")),
                        ("key 'backend' is required", "chroot, docker")),
    "unsupported release": (resolve(env(backend="chroot", release="bookwrom")),
                            ("key 'release'", "'bookwrom'", "did you mean 'bookworm'")),
    "bad package name": (resolve(env(backend="chroot", packages=["Foo"])),
                         ("key 'packages'", "'Foo'", "fix the entry in 'packages'")),
    "bad env name": (resolve({"envs": {"bad name": {"backend": "chroot"}}}),
                     ("[tool.pytest-isolate.envs.bad name]", "'bad name'", "letters, digits")),
    "env not a table": (resolve({"envs": {"e": "chroot"}}),
                        ("[tool.pytest-isolate.envs.e]", "must be a table", "'chroot'")),
    "image and dockerfile": (resolve(env(backend="docker", image="x", dockerfile="Dockerfile")),
                             ("'image'", "'dockerfile'", "keep one")),
    "bad limit": (resolve(env(backend="chroot", memory="lots")),
                  ("[tool.pytest-isolate.envs.e]", "'memory'", "'lots'")),
    "top-level deps key": (resolve({"package": "sdist"}),
                           ("[tool.pytest-isolate] key 'package'", "'sdist'", "editable")),
    "override not allowed": (lambda: config.with_overrides(docker_spec(), {"image": "x"}, "marker"),
                             ("marker", "'image'", "allowed: timeout, reset, network",
                              "pyproject.toml")),
    "override bad reset": (lambda: config.with_overrides(docker_spec(), {"reset": "never"},
                                                         "--isolate-reset"),
                           ("--isolate-reset", "'never'", "test, module, session")),
    "unknown env in a list": (lambda: config.parse_env_list("dokcer", "--isolate-env",
                                                            ["docker", "chroot"]),
                              ("--isolate-env", "'dokcer'", "did you mean 'docker'",
                               "[tool.pytest-isolate.envs.NAME]")),
    "empty env list": (lambda: config.parse_env_list(" , ", "--isolate-env", ["docker"]),
                       ("--isolate-env", "' , '")),
    "host slots": (lambda: config.resolve_hosts({"hosts": {"h": {"docker": "ssh://a",
                                                                   "slots": 0}}},
                                                PYPROJECT, BACKENDS),
                   ("[tool.pytest-isolate.hosts.h]", "'slots'", "0", "slots = 4")),
    "host without endpoint": (lambda: config.resolve_hosts({"hosts": {"h": {"arches": ["arm64"]}}},
                                                           PYPROJECT, BACKENDS),
                              ("[tool.pytest-isolate.hosts.h]", "endpoint", "docker = ")),
    "host unknown key": (lambda: config.resolve_hosts({"hosts": {"h": {"dockr": "x"}}},
                                                      PYPROJECT, BACKENDS),
                         ("[tool.pytest-isolate.hosts.h]", "'dockr'", "did you mean 'docker'")),
    "unknown option": (lambda: config.check_options(with_options(acel="tcg"), ACCEL),
                       ("[tool.pytest-isolate.envs.e]", "'acel'", "did you mean 'accel'",
                        "'docker'", "its options: accel, python")),
    "bad option value": (lambda: config.check_options(with_options(accel="hvf"), ACCEL),
                         ("[tool.pytest-isolate.envs.e]", "'accel'", "one of 'kvm', 'tcg'",
                          "'hvf'", "the accelerator")),
}


def error_of(case: str) -> str:
    make, _ = ERRORS[case]
    with pytest.raises(ConfigError) as info:
        make()
    return str(info.value)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_names_what_where_and_fix(case: str) -> None:
    message = error_of(case)
    for words in ERRORS[case][1]:
        assert words in message, f"{words!r} not in: {message}"


def test_error_messages(golden: Golden) -> None:
    golden.check("config_errors.txt",
                 "".join(f"## {case}\n{error_of(case)}\n\n" for case in sorted(ERRORS)))


TOP_LEVEL_CASES = {
    "unknown key": "[tool.pytest-isolate]\ntimout = 3\n",
    "not a table": "[tool]\npytest-isolate = 3\n",
}


@pytest.mark.parametrize("case", sorted(TOP_LEVEL_CASES))
def test_pyproject_loading_errors_name_the_file(tmp_path: Path, case: str, golden: Golden) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(TOP_LEVEL_CASES[case])
    with pytest.raises(ConfigError) as info:
        config.load_pyproject(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    golden.check(f"config_load_{case.replace(' ', '_')}.txt",
                 message.replace(str(tmp_path), "<dir>") + "\n")


def test_malformed_pyproject_names_the_file_and_the_fix(tmp_path: Path) -> None:
    # no golden file: the parser's own words differ between tomllib versions
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.pytest-isolate\n")
    with pytest.raises(ConfigError) as info:
        config.load_pyproject(path)
    assert str(info.value).startswith(f"{path}: malformed TOML: ")
    assert str(info.value).endswith("; fix the file's syntax")


def test_missing_pyproject_is_an_empty_table() -> None:
    assert config.load_pyproject(None) == {}
    assert config.load_pyproject(Path("/nonexistent/pyproject.toml")) == {}
