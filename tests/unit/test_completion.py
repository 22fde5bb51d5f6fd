"""Shell completion: the script `pytest-isolate completion SHELL` prints, and bash's TAB
driven through it against the real console script (argcomplete's protocol, no mocks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_isolate

PACKAGE_PARENT = str(Path(pytest_isolate.__file__).resolve().parents[1])

# `pytest-isolate` as pip installs it, for the package under test, plus a record of every
# module it imports: completion must not load a backend (an engine's SDK) to answer a TAB.
CONSOLE_SCRIPT = """#!{python}
import sys

class Watch:
    def find_spec(self, name, path=None, target=None):
        with open({log!r}, "a") as f:
            f.write(name + "\\n")
        return None

sys.meta_path.insert(0, Watch())
from pytest_isolate.__main__ import main
if __name__ == "__main__":
    sys.exit(main())
"""

# What bash does on TAB: COMP_* set from the line, the function `complete -F` registered
# for the command called with (command, word, previous word); then print COMPREPLY.
DRIVE = r"""
eval "$(pytest-isolate completion bash)" || exit 3
func=$(complete -p pytest-isolate | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[ -n "$func" ] || exit 4
COMP_LINE=$1
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
"$func" pytest-isolate "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    script = path / "pytest-isolate"
    script.write_text(CONSOLE_SCRIPT.format(python=sys.executable, log=str(tmp_path / "imports")))
    script.chmod(0o755)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text(
        "[project]\nname = 'demo'\nversion = '0'\n\n"
        "[tool.pytest-isolate.envs.trixie-arm]\nbackend = 'chroot'\narch = 'arm64'\n")
    return proj


def environ(bindir: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path}


def tab(line: str, cwd: Path, bindir: Path) -> list[str]:
    """The candidates bash offers for `line` (the cursor at its end)."""
    result = subprocess.run(["bash", "-c", DRIVE, "drive", line], cwd=cwd, env=environ(bindir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return [word.strip() for word in result.stdout.splitlines() if word.strip()]


def imported(bindir: Path) -> set[str]:
    return set((bindir.parent / "imports").read_text().split())


def test_bash_script_is_valid(tmp_path: Path, bindir: Path) -> None:
    result = subprocess.run(["pytest-isolate", "completion", "bash"], env=environ(bindir),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "complete " in result.stdout and "pytest-isolate" in result.stdout
    check = subprocess.run(["bash", "-n"], input=result.stdout, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(("shell", "registers"), [("zsh", "compdef"), ("fish", "complete ")])
def test_zsh_and_fish_scripts(tmp_path: Path, bindir: Path, shell: str, registers: str) -> None:
    result = subprocess.run(["pytest-isolate", "completion", shell], env=environ(bindir),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert registers in result.stdout and "pytest-isolate" in result.stdout
    if shutil.which(shell):  # syntax check where the shell is installed
        flag = "--no-execute" if shell == "fish" else "-n"
        check = subprocess.run([shell, flag], input=result.stdout, capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stderr


def test_unknown_shell_is_refused(tmp_path: Path, bindir: Path) -> None:
    result = subprocess.run(["pytest-isolate", "completion", "tcsh"], env=environ(bindir),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'tcsh'" in result.stderr


def test_tab_completes_commands(project: Path, bindir: Path) -> None:
    words = tab("pytest-isolate ", project, bindir)
    assert {"doctor", "envs", "cache", "setup", "shell", "completion"} <= set(words)
    assert [w for w in tab("pytest-isolate cache ", project, bindir)
            if not w.startswith("-")] == ["ls", "gc", "rm"]
    assert tab("pytest-isolate sh", project, bindir) == ["shell"]


def test_tab_completes_options(project: Path, bindir: Path) -> None:
    words = tab("pytest-isolate cache gc --", project, bindir)
    assert {"--max-age", "--max-size", "--keep-states", "--dry-run", "--cache-dir"} <= set(words)
    assert tab("pytest-isolate setup --dry", project, bindir) == ["--dry-run"]


def test_tab_completes_the_projects_environments(project: Path, bindir: Path) -> None:
    words = tab("pytest-isolate shell ", project, bindir)
    assert {"chroot", "docker", "arm64_vm", "trixie-arm"} <= set(words)
    assert tab("pytest-isolate shell tri", project, bindir) == ["trixie-arm"]
    assert tab("pytest-isolate envs chroot tr", project, bindir) == ["trixie-arm"]
    # the names, like `envs`, resolved without importing any backend module
    loaded = imported(bindir)
    assert "pytest_isolate.config" in loaded
    assert not {m for m in loaded if m.startswith("pytest_isolate.backends.")
                or m.split(".")[0] in ("docker", "libvirt")}


def test_tab_completes_comma_lists(project: Path, bindir: Path) -> None:
    assert tab("pytest-isolate setup --envs chroot,tri", project, bindir) == ["chroot,trixie-arm"]
    words = tab("pytest-isolate setup --backends docker,", project, bindir)
    assert "docker,all" in words and "docker,chroot" in words and "docker,docker" not in words
    assert tab("pytest-isolate setup --arches arm", project, bindir) == ["arm64", "armhf"]


def test_pyproject_option_picks_the_project(tmp_path: Path, project: Path, bindir: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "trixie-arm" not in tab("pytest-isolate shell ", elsewhere, bindir)
    line = f"pytest-isolate shell --pyproject {project / 'pyproject.toml'} tri"
    assert tab(line, elsewhere, bindir) == ["trixie-arm"]


def test_broken_configuration_still_completes_builtins(project: Path, bindir: Path) -> None:
    (project / "pyproject.toml").write_text("[tool.pytest-isolate]\nbogus = 1\n")
    words = tab("pytest-isolate shell ", project, bindir)
    assert {"chroot", "docker", "qemu_vm"} <= set(words)


def test_without_argcomplete_one_clear_message(tmp_path: Path) -> None:
    # the extra not installed: argcomplete made unimportable in this process only
    code = ("import sys; sys.modules['argcomplete'] = None\n"
            "from pytest_isolate.cli import main\nsys.exit(main(['completion', 'bash']))")
    path = os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": path}, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("pytest-isolate: error: shell completion needs the argcomplete "
                             "package, which is not installed: "
                             "pip install 'pytest-isolate-env[completion]'\n")
