"""The project and its test dependencies inside (issue 10): real pip, real index, real plugin.

Generated projects, run by a pytest subprocess of this venv (which has pytest-mock, so the
host run loads it):

- a src-layout project with a dependency from the package index (attrs) and an extra that
  brings pytest-mock: inside chroot and docker its tests import both, use the `mocker`
  fixture (the plugin is loaded inside), satisfy `required_plugins`, run on the venv's
  python with its bin first on PATH, and honour the project's addopts; a .py edited on the
  host is seen on the next run without a rebuild, and the host tree is never written;
- a C extension compiled inside (trixie's Python 3.13, the host has another), kept in a
  layer over the read-only tree, not in the host's tree;
- a requirement that cannot be installed (with pip, where uv installs the others): the
  first test shows the installer's tail and the key, the next one a single line;
- a plugin loaded on the host but not installed inside: one line naming it and the key.

The installs fetch from the machine's configured package index through its proxy and CA:
that is the point (the host's index configuration is carried in).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from shared_support import output, run_pytest

pytestmark = pytest.mark.integration

LIB = '''\
import attrs


@attrs.define
class Point:
    x: int
    y: int


VALUE = 1
'''

TESTS = '''\
import os
import socket
import sys

import pytest


# the project and its dependency are imported inside the tests: the host collects this
# module without them (only the environments have the dependency layer)
def test_deps_inside(mocker):
    import attrs
    import lib

    fake = mocker.Mock(return_value=4)
    assert lib.Point(fake(), 2).x == 4
    assert attrs.__file__.startswith("/.isolate/venv/"), attrs.__file__
    assert sys.prefix == "/.isolate/venv", sys.prefix
    assert os.environ["PATH"].startswith("/.isolate/venv/bin:")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert lib.__file__ == os.path.join(root, "src", "lib", "__init__.py"), lib.__file__
    print("ran-in", socket.gethostname())


def test_value():
    import lib

    assert lib.VALUE == int(open(os.path.join(os.path.dirname(__file__), "expected")).read())


@pytest.mark.slow
def test_strict_marker_declared():
    pass
'''

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "lib"
version = "0.1"
dependencies = ["attrs>=22"]

[project.optional-dependencies]
tests = ["pytest-mock>=3.10"]

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "--strict-markers -rA"
markers = ["slow: declared, so --strict-markers passes inside too"]
required_plugins = ["pytest-mock"]

[tool.pytest-isolate]
extras = ["tests"]
'''


def run(root: Path, cache: str, *args: str) -> subprocess.CompletedProcess[str]:
    # the project is importable on the host as a user's own venv would have it
    return run_pytest(root, cache, "-v", *args, extra_env={"PYTHONPATH": str(root / "src")})


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if "__pycache__" not in p.parts and p.suffix not in (".xml", ".json")}


def test_dependencies_plugins_and_editable_inside(tmp_path: Path, session_cache: str) -> None:
    root = tmp_path / "proj"
    (root / "src" / "lib").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "src" / "lib" / "__init__.py").write_text(LIB)
    (root / "tests" / "test_lib.py").write_text(TESTS)
    (root / "tests" / "expected").write_text("1")
    before = tree(root)

    first = run(root, session_cache, "--isolate-env", "chroot,docker")
    assert first.returncode == 0, output(first)
    text = first.stdout
    assert "(editable); uv)" in text, output(first)  # uv is in this venv: the installer
    for env in ("chroot", "docker"):
        for name in ("test_deps_inside", "test_value", "test_strict_marker_declared"):
            assert f"tests/test_lib.py::{name}[{env}] PASSED" in text, output(first)
    assert "6 passed" in text, output(first)
    # addopts apply inside: -rA's summary lines come from the host (the same -rA)
    assert "PASSED tests/test_lib.py::test_value[chroot]" in text, output(first)
    assert tree(root) == before, "the build wrote into the project tree"

    # edit a .py on the host: the next run sees it, with no new install
    (root / "src" / "lib" / "__init__.py").write_text(LIB.replace("VALUE = 1", "VALUE = 2"))
    (root / "tests" / "expected").write_text("2")
    second = run(root, session_cache, "--isolate-env", "chroot")
    assert second.returncode == 0, output(second)
    assert "installing the dependencies" not in second.stdout, output(second)
    assert "test_value PASSED" in second.stdout, output(second)

    # a new requirement rebuilds the layer (not the root filesystem)
    (root / "pyproject.toml").write_text(PYPROJECT.replace(
        'extras = ["tests"]', 'extras = ["tests"]\ndeps = ["iniconfig"]'))
    third = run(root, session_cache, "--isolate-env", "chroot")
    assert third.returncode == 0, output(third)
    assert "installing the dependencies of 'chroot'" in third.stdout, output(third)
    assert "building trixie" not in third.stdout, output(third)


CEXT_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "cext"
version = "0.1"

[tool.setuptools]
ext-modules = [{name = "cext._speed", sources = ["src/cext/speed.c"]}]

[tool.pytest-isolate.envs.cbuild]
backend = "chroot"
packages = ["gcc", "python3-dev"]
'''

CEXT_C = r'''
#include <Python.h>
static PyObject *add(PyObject *self, PyObject *args) {
    long a, b;
    if (!PyArg_ParseTuple(args, "ll", &a, &b)) return NULL;
    return PyLong_FromLong(a + b + ADDEND);
}
static PyMethodDef M[] = {{"add", add, METH_VARARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_speed", NULL, -1, M};
PyMODINIT_FUNC PyInit__speed(void) { return PyModule_Create(&mod); }
'''

CEXT_TEST = '''\
import sys

import pytest


@pytest.mark.isolate("cbuild")
def test_compiled_inside():
    from cext._speed import add
    import cext._speed as speed

    assert add(2, 3) == 5 + {addend}
    # compiled for the environment's Python, beside its source at the host's path
    assert "cpython-%d%d" % sys.version_info[:2] in speed.__file__, speed.__file__
    assert speed.__file__.startswith({root!r}), speed.__file__
'''


def test_c_extension_is_compiled_inside(tmp_path: Path, session_cache: str) -> None:
    root = tmp_path / "cext"
    (root / "src" / "cext").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pyproject.toml").write_text(CEXT_PYPROJECT)
    (root / "src" / "cext" / "__init__.py").write_text("")
    (root / "src" / "cext" / "speed.c").write_text(CEXT_C.replace("ADDEND", "0"))
    (root / "tests" / "test_c.py").write_text(CEXT_TEST.format(addend=0, root=str(root)))
    before = tree(root)
    first = run(root, session_cache)
    assert first.returncode == 0, output(first)
    assert "test_compiled_inside PASSED" in first.stdout, output(first)
    assert tree(root) == before, "the compiled extension landed in the host's tree"
    # a changed extension source is compiled again
    (root / "src" / "cext" / "speed.c").write_text(CEXT_C.replace("ADDEND", "10"))
    (root / "tests" / "test_c.py").write_text(CEXT_TEST.format(addend=10, root=str(root)))
    second = run(root, session_cache)
    assert second.returncode == 0, output(second)
    assert "installing the dependencies of 'cbuild'" in second.stdout, output(second)


def test_failed_install_is_reported_once(tmp_path: Path, session_cache: str) -> None:
    root = tmp_path / "broken"
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[tool.pytest-isolate]\ninstaller = "pip"\n'
        'deps = ["pytest-isolate-no-such-distribution==0.0.1"]\n')
    (root / "tests" / "test_a.py").write_text("def test_one():\n    pass\n\n"
                                              "def test_two():\n    pass\n")
    result = run(root, session_cache, "--isolate-env", "chroot")
    assert result.returncode == 1, output(result)
    text = result.stdout
    assert "2 errors" in text, output(result)
    assert "; pip)" in text, output(result)  # installer = "pip" even though uv is here
    # the first error has the installer's tail and the key with its file; the second is a line
    assert text.count("pytest-isolate-no-such-distribution") >= 2, output(result)
    assert f"deps from {root / 'pyproject.toml'}: [tool.pytest-isolate] key 'deps'" in text, output(result)
    assert "could not be built earlier in this run" in text, output(result)
    # counted where the reports are shown (CI=true makes the short summary repeat messages)
    errors = text.split("short test summary info")[0]
    assert errors.count("--- log tail ---") == 1, output(result)


def test_plugin_missing_inside_is_one_line(tmp_path: Path, session_cache: str) -> None:
    root = tmp_path / "noplugin"
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[tool.pytest-isolate]\ndeps = ["iniconfig"]\n')
    (root / "tests" / "test_a.py").write_text(
        "def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    result = run(root, session_cache, "--isolate-env", "chroot")
    assert result.returncode == 0, output(result)
    lines = [ln for ln in result.stdout.splitlines() if "not installed inside" in ln]
    assert len(lines) == 1, output(result)
    assert "pytest-mock (plugin 'pytest_mock')" in lines[0], lines
    assert "'deps'" in lines[0], lines
