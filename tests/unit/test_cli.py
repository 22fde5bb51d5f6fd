"""The command line, run as a subprocess against temporary caches and projects (no root needed)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from pytest_isolate import config
from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.cache import Cache

DAY = 86400.0


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_ISOLATE_CACHE_DIR"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest_isolate", *args], cwd=cwd, env=environ,
                          input=stdin, capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pytest-isolate: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def make_entry(cache_dir: Path, key: str, size: int, last_use_days_ago: float,
               spec: dict[str, Any] | None = None, kind: str = "rootfs") -> Path:
    cache = Cache(cache_dir)

    def builder(data: Path, log: Path) -> dict[str, Any]:
        data.mkdir()
        (data / "blob").write_bytes(b"x" * size)
        return {}

    describe = spec or {"release": "bookworm", "arch": "amd64", "variant": "minbase",
                        "packages": ["gcc", "python3"], "setup": ["true"], "setup_network": False}
    entry = cache.get_or_build(kind, key, builder, describe, cache_dir / f"{key}.log")
    stamp = time.time() - last_use_days_ago * DAY
    os.utime(entry.path / "manifest.json", (stamp, stamp))
    return entry.path


def keys_of(cache_dir: Path, project: Path) -> set[str]:
    result = cli("cache", "ls", "--json", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    return {e["key"] for e in json.loads(result.stdout)["entries"]}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("[project]\nname = 'demo'\nversion = '0'\n")
    return proj


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def chroot_key(pyproject: Path | None = None) -> str:
    table = config.load_pyproject(pyproject)
    return config.resolve_envs(table, pyproject, BUILTIN_BACKENDS)["chroot"].rootfs_key()


# ------------------------------------------------------------------ general


def test_help_lists_every_command(project: Path) -> None:
    result = cli("--help", cwd=project)
    assert result.returncode == 0
    for command in ("doctor", "envs", "cache", "shell"):
        assert command in result.stdout
    gc_help = cli("cache", "gc", "--help", cwd=project)
    assert gc_help.returncode == 0
    assert "--max-size" in gc_help.stdout and "--max-age" in gc_help.stdout


def test_no_command_and_bad_arguments_exit_2(project: Path) -> None:
    assert cli(cwd=project).returncode == 2
    assert cli("cache", cwd=project).returncode == 2
    assert "invalid choice" in one_line_error(cli("bogus", cwd=project))
    assert "invalid size" in one_line_error(cli("cache", "gc", "--max-size", "lots", cwd=project))
    assert "invalid number of days" in one_line_error(
        cli("cache", "gc", "--max-age", "-1", cwd=project))


def test_console_script_is_installed(project: Path) -> None:
    script = Path(sys.executable).parent / "pytest-isolate"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "doctor" in result.stdout


# ------------------------------------------------------------------ cache ls


def test_ls_of_missing_cache_creates_nothing(project: Path, cache_dir: Path) -> None:
    result = cli("cache", "ls", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert "no entries" in result.stdout
    assert not cache_dir.exists()


def test_ls_shows_entries_without_touching_them(project: Path, cache_dir: Path) -> None:
    key = chroot_key(project / "pyproject.toml")
    make_entry(cache_dir, key, 300_000, 2.0)
    make_entry(cache_dir, "b" * 24, 10_000, 5.0)
    before = (cache_dir / "rootfs" / key / "manifest.json").stat().st_mtime

    result = cli("cache", "ls", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"cache: {cache_dir} (--cache-dir)")
    row = next(line for line in lines if line.startswith(key))
    assert "bookworm/amd64 minbase +gcc setup:1" in row
    assert "chroot" in row  # the environment whose rootfs this is
    assert "2d ago" in row
    assert "2 entries" in lines[-1]

    data = json.loads(cli("cache", "ls", "--json", "--cache-dir", str(cache_dir),
                          cwd=project).stdout)
    by_key = {e["key"]: e for e in data["entries"]}
    assert set(by_key) == {key, "b" * 24}
    assert by_key[key]["size"] >= 300_000
    assert by_key[key]["kind"] == "rootfs"
    assert "chroot" in by_key[key]["envs"] and by_key["b" * 24]["envs"] == []
    assert by_key[key]["spec"]["release"] == "bookworm"
    assert (cache_dir / "rootfs" / key / "manifest.json").stat().st_mtime == before


def test_ls_ignores_half_built_and_foreign_directories(project: Path, cache_dir: Path) -> None:
    make_entry(cache_dir, "c" * 24, 100, 1.0)
    (cache_dir / "rootfs" / ("d" * 24)).mkdir()  # no manifest: not an entry
    (cache_dir / "rootfs" / ("e" * 24)).mkdir()
    (cache_dir / "rootfs" / ("e" * 24) / "manifest.json").write_text("{broken")
    assert keys_of(cache_dir, project) == {"c" * 24}


# ------------------------------------------------------------------ cache gc


def test_gc_max_age_removes_only_old_entries(project: Path, cache_dir: Path) -> None:
    make_entry(cache_dir, "a" * 24, 1000, 10.0)
    make_entry(cache_dir, "b" * 24, 1000, 2.0)
    result = cli("cache", "gc", "--max-age", "5", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"removed rootfs/{'a' * 24}" in result.stdout
    assert keys_of(cache_dir, project) == {"b" * 24}
    assert not (cache_dir / "rootfs" / ("a" * 24)).exists()


def test_gc_max_size_removes_least_recently_used_first(project: Path, cache_dir: Path) -> None:
    make_entry(cache_dir, "a" * 24, 100_000, 3.0)  # oldest use
    make_entry(cache_dir, "b" * 24, 100_000, 1.0)  # newest use
    make_entry(cache_dir, "c" * 24, 100_000, 2.0)
    result = cli("cache", "gc", "--max-size", "150K", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert keys_of(cache_dir, project) == {"b" * 24}
    assert "removed 2 entries" in result.stdout


def test_gc_dry_run_removes_nothing(project: Path, cache_dir: Path) -> None:
    make_entry(cache_dir, "a" * 24, 1000, 30.0)
    result = cli("cache", "gc", "--max-age", "1", "--dry-run", "--cache-dir", str(cache_dir),
                 cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"would remove rootfs/{'a' * 24}" in result.stdout
    assert keys_of(cache_dir, project) == {"a" * 24}


def test_gc_keeps_entries_in_use(project: Path, cache_dir: Path) -> None:
    building = make_entry(cache_dir, "a" * 24, 1000, 30.0)
    session = make_entry(cache_dir, "b" * 24, 1000, 30.0)
    make_entry(cache_dir, "c" * 24, 1000, 0.0)  # used just now: a session may be starting
    free = make_entry(cache_dir, "d" * 24, 1000, 30.0)
    build_lock = FileLock(str(cache_dir / "locks" / f"rootfs-{'a' * 24}.lock"))
    fd = os.open(session / "manifest.json", os.O_RDONLY)
    try:
        with build_lock:
            fcntl.flock(fd, fcntl.LOCK_SH)  # what a session holds on an entry it uses
            result = cli("cache", "gc", "--max-size", "0", "--cache-dir", str(cache_dir),
                         cwd=project)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert f"kept rootfs/{'a' * 24}: being built" in result.stdout
    assert f"kept rootfs/{'b' * 24}: in use by a running session" in result.stdout
    assert f"kept rootfs/{'c' * 24}: used in the last" in result.stdout
    assert "still above --max-size" in result.stdout
    assert building.exists() and session.exists() and not free.exists()
    assert keys_of(cache_dir, project) == {"a" * 24, "b" * 24, "c" * 24}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def age(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    for sub in sorted(path.rglob("*"), reverse=True):
        os.utime(sub, (stamp, stamp), follow_symlinks=False)
    os.utime(path, (stamp, stamp))


def test_gc_cleans_stale_builds_and_finished_runs(project: Path, cache_dir: Path) -> None:
    Cache(cache_dir)
    stale = cache_dir / "tmp" / f"rootfs-{'a' * 24}.x1"
    (stale / "data" / "etc").mkdir(parents=True)
    active = cache_dir / "tmp" / f"rootfs-{'b' * 24}.x2"
    active.mkdir()
    runs = cache_dir / "runs"
    old_finished = runs / f"20250101-000000-{dead_pid()}"
    old_running = runs / f"20250101-000000-{os.getpid()}"
    new_finished = runs / f"20250102-000000-{dead_pid()}-gw0"
    for run in (old_finished, old_running, new_finished):
        (run / "logs" / "chroot").mkdir(parents=True)
        (run / "logs" / "chroot" / "agent.log").write_text("log\n")
    age(old_finished, 10)
    age(old_running, 10)
    age(new_finished, 1)
    with FileLock(str(cache_dir / "locks" / f"rootfs-{'b' * 24}.lock")):
        result = cli("cache", "gc", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and active.exists()
    assert not old_finished.exists()
    assert old_running.exists() and new_finished.exists()
    assert "removed 1 stale build directories" in result.stdout
    assert "removed 1 finished run directories older than 7 days" in result.stdout
    # --max-age also applies to finished runs
    result = cli("cache", "gc", "--max-age", "0.5", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert not new_finished.exists() and old_running.exists()


def test_gc_of_missing_cache_is_a_no_op(project: Path, cache_dir: Path) -> None:
    result = cli("cache", "gc", "--max-size", "0", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout and not cache_dir.exists()


# ------------------------------------------------------------------ cache rm


def test_rm_by_prefix_kind_and_all(project: Path, cache_dir: Path) -> None:
    make_entry(cache_dir, "a1" + "0" * 22, 10, 1.0)
    make_entry(cache_dir, "a2" + "0" * 22, 10, 1.0)
    make_entry(cache_dir, "b1" + "0" * 22, 10, 1.0, kind="disk")
    make_entry(cache_dir, "c1" + "0" * 22, 10, 1.0)

    assert "ambiguous" in one_line_error(cli("cache", "rm", "a", "--cache-dir", str(cache_dir),
                                             cwd=project))
    assert "no entry matches" in one_line_error(
        cli("cache", "rm", "zz", "--cache-dir", str(cache_dir), cwd=project))
    assert "--all" in one_line_error(cli("cache", "rm", "--cache-dir", str(cache_dir), cwd=project))
    assert "no entry matches" in one_line_error(
        cli("cache", "rm", "rootfs/b1", "--cache-dir", str(cache_dir), cwd=project))

    result = cli("cache", "rm", "a1", "disk/b1", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("removed ") == 2
    assert keys_of(cache_dir, project) == {"a2" + "0" * 22, "c1" + "0" * 22}

    result = cli("cache", "rm", "--all", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    assert keys_of(cache_dir, project) == set()


def test_rm_refuses_an_entry_in_use(project: Path, cache_dir: Path) -> None:
    path = make_entry(cache_dir, "a" * 24, 10, 1.0)
    fd = os.open(path / "manifest.json", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        result = cli("cache", "rm", "aaaa", "--cache-dir", str(cache_dir), cwd=project)
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert "in use by a running session" in result.stderr
    assert path.exists()


# ------------------------------------------------------------------ cache location


def test_cache_dir_precedence(tmp_path: Path) -> None:
    proj = tmp_path / "p"
    (proj / "sub").mkdir(parents=True)
    (proj / "pyproject.toml").write_text('[tool.pytest-isolate]\ncache_dir = "my-cache"\n')
    result = cli("cache", "ls", cwd=proj / "sub", env={"PYTEST_ISOLATE_CACHE_DIR": str(tmp_path / "e")})
    assert result.stdout.startswith(f"cache: {proj / 'my-cache'} ({proj / 'pyproject.toml'}: "
                                    "[tool.pytest-isolate] key 'cache_dir')")
    result = cli("cache", "ls", "--cache-dir", str(tmp_path / "opt"), cwd=proj)
    assert result.stdout.startswith(f"cache: {tmp_path / 'opt'} (--cache-dir)")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pyproject.toml").write_text("")
    result = cli("cache", "ls", cwd=bare, env={"PYTEST_ISOLATE_CACHE_DIR": str(tmp_path / "e")})
    assert result.stdout.startswith(f"cache: {tmp_path / 'e'} (PYTEST_ISOLATE_CACHE_DIR)")
    result = cli("cache", "ls", cwd=bare, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert result.stdout.startswith(f"cache: {tmp_path / 'xdg' / 'pytest-isolate'} (default")


# ------------------------------------------------------------------ envs


PYPROJECT = """
[tool.pytest-isolate.envs.trixie-arm]
backend = "chroot"
arch = "arm64"
packages = ["gcc", "python3-dev"]
setup = ["true"]

[tool.pytest-isolate.envs.docker]
release = "bookworm"
"""


INI_FILES = {
    "pytest.ini": "[pytest]\nisolate_cache_dir = {value}\n",
    "tox.ini": "[tox]\nenvlist = py3\n\n[pytest]\nisolate_cache_dir = {value}\n",
    "setup.cfg": "[metadata]\nname = demo\n\n[tool:pytest]\nisolate_cache_dir = {value}\n",
    "pyproject.toml": '[tool.pytest.ini_options]\nisolate_cache_dir = "{value}"\n',
}


def pytest_cache_line(cwd: Path) -> str:
    """The cache the plugin reports when pytest itself runs in cwd."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_ISOLATE_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-p", "no:cacheprovider"],
                            cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("isolate: cache ")]
    return line.removeprefix("isolate: ")


@pytest.mark.parametrize("inifile", sorted(INI_FILES))
def test_cache_dir_from_pytests_own_inifile(tmp_path: Path, inifile: str) -> None:
    """isolate_cache_dir in whichever file pytest takes its configuration from (found by
    pytest's rules from a sub-directory, relative to the rootdir) is the cache `cache ls`
    looks at, the one `pytest` run in the same place uses."""
    proj = tmp_path / "p"
    (proj / "sub").mkdir(parents=True)
    (proj / inifile).write_text(INI_FILES[inifile].format(value="ini-cache"))
    if inifile != "pyproject.toml":  # a pyproject.toml of the project's own, no pytest table
        (proj / "pyproject.toml").write_text("[project]\nname = 'demo'\nversion = '0'\n")
    result = cli("cache", "ls", "--json", cwd=proj / "sub")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cache_dir"] == str(proj / "ini-cache")
    assert data["cache_dir_source"] == f"ini key 'isolate_cache_dir' in {proj / inifile}"
    assert pytest_cache_line(proj / "sub") == f"cache {data['cache_dir']} ({data['cache_dir_source']})"


def test_pytest_ini_wins_over_pyproject_as_in_pytest(tmp_path: Path) -> None:
    """pytest reads pytest.ini before pyproject.toml in the same directory: so does the CLI,
    while the [tool.pytest-isolate] table still comes from the rootdir's pyproject.toml."""
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "pytest.ini").write_text(INI_FILES["pytest.ini"].format(value="from-ini"))
    (proj / "pyproject.toml").write_text(INI_FILES["pyproject.toml"].format(value="from-toml")
                                         + PYPROJECT)
    data = json.loads(cli("cache", "ls", "--json", cwd=proj).stdout)
    assert data["cache_dir"] == str(proj / "from-ini")
    assert pytest_cache_line(proj) == f"cache {proj / 'from-ini'} ({data['cache_dir_source']})"
    envs = json.loads(cli("envs", "--json", cwd=proj).stdout)
    assert envs["pyproject"] == str(proj / "pyproject.toml") and "trixie-arm" in envs["envs"]


def test_envs_shows_values_with_their_source(project: Path, cache_dir: Path) -> None:
    pyproject = project / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    result = cli("envs", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"project: {pyproject}" in text
    assert "trixie-arm  (pyproject.toml)" in text
    assert "docker  (built-in, changed in pyproject.toml)" in text
    assert "chroot  (built-in)" in text
    section = text.split("trixie-arm  (pyproject.toml)")[1].split("\n\n")[0]
    arch_line = next(line for line in section.splitlines() if line.split()[:1] == ["arch"])
    assert arch_line.split()[1] == "arm64"
    assert "[tool.pytest-isolate.envs.trixie-arm] key 'arch'" in arch_line
    assert "not built yet" in text

    specs = config.resolve_envs(config.load_pyproject(pyproject), pyproject, BUILTIN_BACKENDS)
    make_entry(cache_dir, specs["trixie-arm"].rootfs_key(), 10, 0.0)
    data = json.loads(cli("envs", "--json", "trixie-arm", "docker", "--cache-dir", str(cache_dir),
                          cwd=project).stdout)
    assert set(data["envs"]) == {"trixie-arm", "docker"}
    arm = data["envs"]["trixie-arm"]
    assert arm["rootfs_key"] == specs["trixie-arm"].rootfs_key()
    assert arm["rootfs_cached"] is True
    assert arm["values"]["packages"]["value"] == ["gcc", "python3-dev"]
    assert arm["values"]["release"]["source"] == "built-in default"
    docker = data["envs"]["docker"]
    assert docker["values"]["backend"]["source"] == "built-in default"
    assert docker["values"]["release"] == {
        "value": "bookworm", "source": f"{pyproject}: [tool.pytest-isolate.envs.docker] key 'release'"}
    assert docker["rootfs_cached"] is False


def test_envs_without_pyproject_lists_builtins(tmp_path: Path) -> None:
    result = cli("envs", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["pyproject"] is None
    assert set(data["envs"]) == {*config.BUILTIN_ENVS, *config.PYTHON_ENVS}


def test_envs_shows_the_root_filesystem_a_vm_boots(tmp_path: Path) -> None:
    """A VM's root filesystem has a kernel and busybox besides the spec's packages: its
    key is not the chroot's, and `envs` / `cache ls` name the one the backend builds."""
    from pytest_isolate.backends.qemu import vm_rootfs_spec

    data = json.loads(cli("envs", "--json", "qemu_vm", "chroot", cwd=tmp_path).stdout)
    specs = config.resolve_envs({}, None, BUILTIN_BACKENDS)
    assert data["envs"]["qemu_vm"]["rootfs_key"] == vm_rootfs_spec(specs["qemu_vm"]).rootfs_key()
    assert data["envs"]["chroot"]["rootfs_key"] == specs["chroot"].rootfs_key()
    assert data["envs"]["qemu_vm"]["rootfs_key"] != data["envs"]["chroot"]["rootfs_key"]


def test_envs_unknown_name(project: Path) -> None:
    line = one_line_error(cli("envs", "chrot", cwd=project))
    assert "unknown environment 'chrot'" in line and "did you mean 'chroot'" in line


@pytest.mark.parametrize("content, expected", [
    ("[tool.pytest-isolate\n", "malformed TOML"),
    ("[tool.pytest-isolate]\ncache_dri = 'x'\n", "did you mean 'cache_dir'"),
    ("[tool.pytest-isolate.envs.x]\nbackend = 'chroott'\n", "unknown backend 'chroott'"),
    ("[tool.pytest-isolate.envs.x]\nbackend = 'chroot'\narch = 'arm65'\n", "unsupported arch"),
    ("[tool.pytest-isolate.envs.x]\narch = 'arm64'\n", "key 'backend' is required"),
    ("[tool.pytest-isolate.envs.x]\nbackend = 'chroot'\npackages = 'gcc'\n",
     "key 'packages' must be a list of strings"),
])
@pytest.mark.parametrize("command", [["envs"], ["doctor"], ["cache", "ls"], ["shell", "chroot"]])
def test_bad_pyproject_is_a_one_line_error(project: Path, content: str, expected: str,
                                           command: list[str]) -> None:
    (project / "pyproject.toml").write_text(content)
    line = one_line_error(cli(*command, cwd=project,
                              env={"PYTEST_ISOLATE_CACHE_DIR": str(project / "cache")}))
    assert expected in line
    assert str(project / "pyproject.toml") in line


def test_pyproject_option(tmp_path: Path, project: Path) -> None:
    (project / "pyproject.toml").write_text(PYPROJECT)
    result = cli("envs", "--json", "--pyproject", str(project / "pyproject.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trixie-arm" in json.loads(result.stdout)["envs"]
    assert "is not a file" in one_line_error(cli("envs", "--pyproject", str(tmp_path / "nope"),
                                                 cwd=tmp_path))


# ------------------------------------------------------------------ shell / doctor


def test_shell_unknown_environment(project: Path, cache_dir: Path) -> None:
    # every backend has a shell (tests/integration/test_interactive.py drives them)
    line = one_line_error(cli("shell", "nope", "--cache-dir", str(cache_dir), cwd=project))
    assert "unknown environment 'nope'" in line


def unregistered_foreign_arch() -> str:
    from pytest_isolate.spec import ARCH_MACHINES, host_arch

    for arch, machine in ARCH_MACHINES.items():
        if arch != host_arch() and not Path(f"/proc/sys/fs/binfmt_misc/qemu-{machine}").exists():
            return arch
    pytest.fail("every foreign architecture has a qemu-user interpreter registered")


def test_doctor_fails_when_a_project_env_cannot_run(project: Path, cache_dir: Path) -> None:
    arch = unregistered_foreign_arch()
    (project / "pyproject.toml").write_text(
        f"[tool.pytest-isolate.envs.foreign]\nbackend = 'chroot'\narch = '{arch}'\n")
    result = cli("doctor", "--cache-dir", str(cache_dir), cwd=project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "foreign (chroot, " in result.stdout and "NOT usable" in result.stdout
    assert "update-binfmts --enable qemu-" in result.stdout
    # the exact setup invocation that fixes it
    assert f"pytest-isolate setup --arches {arch}" in result.stdout
    assert "set up what it needs: " in result.stdout and "setup --envs foreign" in result.stdout
    assert "NOT OK" in result.stdout

    data = json.loads(cli("doctor", "--json", "--cache-dir", str(cache_dir), cwd=project).stdout)
    assert data["ok"] is False
    assert set(data["project"]["envs"]) == {"foreign"}
    assert data["project"]["envs"]["foreign"]["usable"] is False
    assert set(data["backends"]) == {"chroot", "docker", "podman", "lxc", "schroot", "qemu"}
    assert data["cache"]["path"] == str(cache_dir)
    for name, info in data["backends"].items():
        assert isinstance(info["available"], bool), name
        if not info["available"]:
            assert info["reason"], name
