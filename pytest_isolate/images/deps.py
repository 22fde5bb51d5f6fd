"""The dependency layer: the project and its test dependencies in a virtual environment.

Spec keys, with tox's names: ``package`` (editable | wheel | skip), ``extras``,
``dependency_groups`` (PEP 735) and ``deps`` (requirement lines, ``-r``/``-c`` files
relative to the rootdir).  The layer is built once per key on top of the environment's
cached root filesystem, never into it:

- a virtual environment, built inside the environment by its own Python (so wheels and
  compiled extensions fit its architecture and Python), into a cache entry that is bound
  read-only at ``/.isolate/venv`` at run time; its ``bin`` comes first on PATH and the
  agent (so pytest) runs on its interpreter;
- for ``package = "editable"``, the files the build leaves in the project tree (compiled
  extensions) are caught by a writable overlay over the rootdir during the build and kept
  as a layer that the agent lays over the read-only rootdir at run time.  The source tree
  on the host is never written, and a ``.py`` edited on the host is seen at once.

The network is on during the build only.  The host's index configuration goes in with it:
its pip configuration files merged into one, its ``PIP_*`` and ``UV_*`` variables, proxies,
the CA bundle it trusts, and every local path or ``file://`` index those name.  At test
time the environment has no network, as always.

The key covers every input: the rootfs, the spec's keys, the pyproject.toml tables used,
requirement and lock files, the extension sources, and the index configuration.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import ssl
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_isolate.errors import ConfigError, ProvisionError
from pytest_isolate.spec import EnvSpec, content_hash

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

#: Bump when the way the layer is built changes.
DEPS_FORMAT = 1
VENV = "/.isolate/venv"
#: What the build leaves in the project tree (compiled extensions), laid over the rootdir.
PROJECT_LAYER = "/.isolate/project-layer"
_BUILD = "/.isolate/build"
_PIP = "/.isolate/pip"
_CA = "/.isolate/ca-certificates.crt"
_PIP_CONF = f"{_BUILD}/pip.conf"
_PIP_CACHE = "/.isolate/pip-cache"
#: What the build keeps of the project tree: compiled extension modules.
LAYER_SUFFIXES = (".so", ".pyd")
#: Source files whose change means the editable install must be built again.
BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "meson.build", "CMakeLists.txt",
               "Cargo.toml", "MANIFEST.in")
EXTENSION_SUFFIXES = (".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".pyx", ".pxd", ".pxi",
                      ".f", ".f90", ".rs")
LOCK_FILES = ("uv.lock", "pylock.toml", "poetry.lock", "pdm.lock")
SKIP_DIRS = frozenset((".git", ".hg", ".svn", ".tox", ".nox", ".venv", "venv", "env", "build",
                       "dist", "node_modules", "__pycache__", ".mypy_cache", ".pytest_cache",
                       ".ruff_cache", ".eggs"))
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
#: Host variables that make no sense inside (paths of the host's own Python or user).
DROP_PIP_VARS = frozenset(("PIP_CONFIG_FILE", "PIP_CERT", "PIP_CACHE_DIR", "PIP_TARGET",
                           "PIP_PREFIX", "PIP_USER", "PIP_REQUIRE_VIRTUALENV", "PIP_SRC",
                           "PIP_BREAK_SYSTEM_PACKAGES", "PIP_PYTHON"))


@dataclasses.dataclass(frozen=True)
class DepsLayer:
    """A built layer, as the backends mount it (host paths of the cache entry)."""

    key: str
    entry: Any
    venv: Path
    #: compiled files the build left in the project tree; None when there are none
    project: Path | None
    #: host pytest-isolate warns once when the venv holds another pytest than the host's
    venv_pytest: str | None = None


@dataclasses.dataclass(frozen=True)
class DepsPlan:
    """What goes into the layer, resolved on the host (pure: no building)."""

    package: str
    project: str | None
    extras: tuple[str, ...]
    requirements: tuple[str, ...]
    #: content hashes of every file the layer depends on (path -> sha256)
    files: Mapping[str, str]
    sources: Mapping[str, str]

    def lines(self, rootdir: Path) -> list[str]:
        """The requirements file the installer reads."""
        out = list(self.requirements)
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        if self.package == "editable":
            out.append(f"-e {rootdir}{extras}")
        elif self.package == "wheel":
            out.append(f"{rootdir}{extras}")
        return out


def _project_table(rootdir: Path) -> dict[str, Any]:
    path = rootdir / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return data


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(rootdir: Path) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(rootdir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            yield Path(dirpath) / name


def resolve_groups(data: Mapping[str, Any], names: tuple[str, ...], where: str) -> list[str]:
    """PEP 735: the requirement strings of dependency groups, includes followed."""
    groups = data.get("dependency-groups", {})
    if not isinstance(groups, dict):
        raise ConfigError(f"{where}: [dependency-groups] in pyproject.toml is not a table")

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    table = {norm(k): v for k, v in groups.items()}
    out: list[str] = []

    def add(name: str, seen: tuple[str, ...]) -> None:
        key = norm(name)
        if key in seen:
            raise ConfigError(f"{where}: dependency group {name!r} includes itself "
                              f"({' -> '.join((*seen, key))})")
        if key not in table:
            known = ", ".join(sorted(table)) or "none"
            raise ConfigError(f"{where}: no dependency group {name!r} in the rootdir's "
                              f"pyproject.toml [dependency-groups] (its groups: {known})")
        for item in table[key]:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and "include-group" in item:
                add(str(item["include-group"]), (*seen, key))
            else:
                raise ConfigError(f"{where}: dependency group {name!r} has an entry that is "
                                  f"neither a requirement nor an include-group: {item!r}")

    for name in names:
        add(name, ())
    return list(dict.fromkeys(out))


def make_plan(spec: EnvSpec, rootdir: Path) -> DepsPlan | None:
    """What the layer of spec holds; None when there is nothing to install."""
    data = _project_table(rootdir)
    project = data.get("project") if isinstance(data.get("project"), dict) else None
    package = spec.package or ("editable" if project is not None else "skip")
    sources = {k: spec.source(k) for k in ("package", "extras", "dependency_groups", "deps")}
    if package != "skip" and not any((rootdir / f).is_file()
                                     for f in ("pyproject.toml", "setup.py")):
        raise ConfigError(f"{sources['package']}: package = {package!r}, but the rootdir "
                          f"{rootdir} has neither pyproject.toml nor setup.py; set "
                          "package = \"skip\" or run pytest from the project's root")
    if package == "skip" and not spec.deps and not spec.dependency_groups:
        if spec.extras:
            raise ConfigError(f"{sources['extras']}: extras need the project installed, but "
                              f"package is 'skip' ({sources['package']})")
        return None
    files: dict[str, str] = {}
    requirements: list[str] = []
    for line in spec.deps:
        words = shlex.split(line)
        if words and words[0] in ("-r", "-c", "--requirement", "--constraint") and len(words) == 2:
            path = (rootdir / words[1]).resolve()
            if not path.is_file():
                raise ConfigError(f"{sources['deps']}: {line!r}: no file {path}")
            _add_requirement_file(path, files, sources["deps"])
            requirements.append(f"{words[0]} {path}")
        else:
            requirements.append(line)
    if spec.dependency_groups:
        requirements += resolve_groups(data, spec.dependency_groups, sources["dependency_groups"])
    if package != "skip":
        for name in BUILD_FILES:
            if (rootdir / name).is_file():
                files[name] = _hash_file(rootdir / name)
        for path in _walk(rootdir):
            rel = str(path.relative_to(rootdir))
            if path.suffix in EXTENSION_SUFFIXES or (package == "wheel" and path.is_file()):
                files[rel] = _hash_file(path)
    for name in LOCK_FILES:
        if (rootdir / name).is_file():
            files[name] = _hash_file(rootdir / name)
    project_name = project.get("name") if project else None
    return DepsPlan(package, str(project_name) if project_name else None, spec.extras, tuple(requirements),
                    files, sources)


def _add_requirement_file(path: Path, files: dict[str, str], where: str,
                          depth: int = 0) -> None:
    """Hash a requirements file and the files it names with -r/-c (relative to it)."""
    if depth > 10 or str(path) in files:
        return
    files[str(path)] = _hash_file(path)
    for raw in path.read_text(errors="replace").splitlines():
        words = raw.split()
        if len(words) == 2 and words[0] in ("-r", "-c", "--requirement", "--constraint"):
            nested = (path.parent / words[1]).resolve()
            if nested.is_file():
                _add_requirement_file(nested, files, where, depth + 1)


# ---------------------------------------------------------------- the host's index settings

def _pip_config_files() -> list[Path]:
    """pip's configuration files, lowest priority first (as pip reads them)."""
    if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    home = Path.home()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    paths = [Path(d) / "pip" / "pip.conf" for d in dirs] + [Path("/etc/pip.conf")]
    paths += [home / ".pip" / "pip.conf", config_home / "pip" / "pip.conf",
              Path(sys.prefix) / "pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        paths.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return [p for p in paths if p.is_file()]


@dataclasses.dataclass
class IndexConfig:
    """The host's package-index configuration, as it goes into a build."""

    pip_conf: str
    env: dict[str, str]
    #: host paths that the configuration names (find-links, file:// indexes, constraints)
    paths: list[str]
    #: the CA bundle the host trusts (bound at _CA), or None
    ca: str | None
    #: the merged [global] and [install] settings (pip's names), for uv
    settings: dict[str, str] = dataclasses.field(default_factory=dict)

    def uv_env(self) -> dict[str, str]:
        """The same index settings in uv's variables (uv reads no pip.conf)."""
        def value(key: str) -> str | None:
            return self.env.get("PIP_" + key.upper().replace("-", "_")) or self.settings.get(key)

        out = {}
        for pip_key, uv_var, sep in (("index-url", "UV_DEFAULT_INDEX", " "),
                                     ("extra-index-url", "UV_INDEX", " "),
                                     ("find-links", "UV_FIND_LINKS", ","),
                                     ("constraint", "UV_CONSTRAINT", " ")):
            found = value(pip_key)
            if found and uv_var not in self.env:
                out[uv_var] = sep.join(found.split())
        if "UV_INDEX" in out and "UV_INDEX_STRATEGY" not in self.env:
            out["UV_INDEX_STRATEGY"] = "unsafe-best-match"  # pip's: the best version anywhere
        return out

    def key_fields(self) -> dict[str, Any]:
        """What decides which packages are found (not credentials, not the CA)."""
        return {"pip_conf": _strip_secrets(self.pip_conf),
                "env": sorted((k, _strip_secrets(v)) for k, v in self.env.items()
                              if k.startswith(("PIP_", "UV_")) and "CERT" not in k)}


def _strip_secrets(text: str) -> str:
    return re.sub(r"://[^/@\s]+@", "://***@", text)


def host_index_config() -> IndexConfig:
    merged = configparser.RawConfigParser()
    for path in _pip_config_files():
        try:
            merged.read(path)
        except configparser.Error:
            continue
    env: dict[str, str] = {}
    for name, value in os.environ.items():
        pip = name.startswith("PIP_") and name not in DROP_PIP_VARS
        uv = name.startswith("UV_") and name not in ("UV_CACHE_DIR", "UV_PYTHON")
        if pip or uv or name.lower() in PROXY_VARS:
            env[name] = value
    ca = None
    for candidate in (os.environ.get("PIP_CERT"),
                      merged.get("global", "cert", fallback=None),
                      os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      ssl.get_default_verify_paths().cafile):
        if candidate and os.path.isfile(candidate):
            ca = candidate
            break
    for section in merged.sections():
        if merged.has_option(section, "cert"):
            merged.remove_option(section, "cert")
    paths: list[str] = []
    values = [v for s in merged.sections() for _, v in merged.items(s)] + list(env.values())
    for value in values:
        for word in value.split():
            local = word
            if word.startswith("file://"):
                # a local index's pages link to files beside it (../files/...): its parent
                local = os.path.dirname(word[len("file://"):].rstrip("/"))
            if local.startswith("/") and os.path.exists(local) and local not in paths:
                paths.append(local)
    lines = []
    for section in merged.sections():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in merged.items(section)]
    settings = {k: v for section in ("global", "install") if merged.has_section(section)
                for k, v in merged.items(section)}
    return IndexConfig("\n".join(lines) + "\n", env, paths, ca, settings)


# ---------------------------------------------------------------- building

def layer_key(spec: EnvSpec, rootfs_key: str, plan: DepsPlan, index: IndexConfig,
              rootdir: Path, installer: str) -> str:
    return content_hash({
        "format": DEPS_FORMAT, "rootfs": rootfs_key, "rootdir": str(rootdir),
        "python": spec.option("python", "python3"), "package": plan.package,
        "extras": list(plan.extras), "requirements": list(plan.requirements),
        "files": dict(sorted(plan.files.items())), "index": index.key_fields(),
        "installer": installer,
    })


def host_uv() -> str | None:
    """The host's uv binary: beside this Python (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def choose_installer(spec: EnvSpec) -> tuple[str, str | None]:
    """("uv", its path) or ("pip", None) for spec's installer key (auto: uv when the host
    has it; it then runs natively even in a foreign environment, see host_runtime_binds)."""
    wanted = spec.installer
    if wanted == "pip":
        return "pip", None
    uv = host_uv()
    if uv is not None:
        return "uv", uv
    if wanted == "uv":
        raise ConfigError(f"{spec.source('installer')}: installer = 'uv', but the host has no "
                          "uv (pip install uv); use installer = \"auto\" or \"pip\"")
    return "pip", None


def host_runtime_binds(binary: str) -> list[str]:
    """The host paths a dynamically linked host program needs inside a root filesystem of
    another architecture: its loader and the directories of its libraries (ldd's answer).

    Bound at their own paths, they let the host's uv run natively in an emulated arm64
    root, where pip would run under qemu-user (minutes instead of seconds); the foreign
    Python it installs for still runs through binfmt.  Empty for a static program."""
    import subprocess

    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    paths: list[str] = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else (words[0] if words else "")
        if not path.startswith("/"):
            continue
        wanted = os.path.dirname(path) if "=>" in line else path
        if wanted not in paths:
            paths.append(wanted)
    return paths


#: The oldest pip that runs on every Python an environment may have (3.12 removed what
#: older ones import).
MIN_PIP = (23, 2)


def host_pip() -> str:
    """The directory of the host's pip package (shipped into the build: pure Python)."""
    spec = importlib.util.find_spec("pip")
    if spec is None or spec.origin is None:
        raise ProvisionError(
            "installing the project's dependencies inside needs uv or pip on the host (run "
            "inside the environment on the environment's own Python): "
            f"{sys.executable} -m pip install uv")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("pip")
    except PackageNotFoundError:
        found = "0"
    numbers = tuple(int(p) for p in re.findall(r"\d+", found)[:2])
    if numbers < MIN_PIP:
        raise ProvisionError(
            f"the host's pip {found} is too old to install into the Python inside an "
            f"environment (it needs pip >= {'.'.join(map(str, MIN_PIP))}): "
            f"{sys.executable} -m pip install -U pip, or install uv "
            f"({sys.executable} -m pip install uv), which is used instead")
    return os.path.dirname(spec.origin)


BUILD_SCRIPT = r"""
set -eu
if [ "$INSTALLER" = uv ]; then
  /.isolate/uv venv --quiet --python "$(command -v "$PYTHON")" "$VENV"
else
  "$PYTHON" -m venv --without-pip "$VENV" || {
    echo "pytest-isolate: '$PYTHON -m venv' failed inside the environment" >&2; exit 3; }
fi
if [ -n "$PROJECT" ]; then
  mount -t overlay isolate-project \
    -o "lowerdir=$PROJECT,upperdir=$LAYER/upper,workdir=$LAYER/work" "$PROJECT"
fi
cd /
echo "--- requirements ($BUILD/requirements.txt)"; cat "$BUILD/requirements.txt"
if [ "$INSTALLER" = uv ]; then
  # uv caches a local tree's build by its metadata files: the layer key decided a build
  /.isolate/uv pip install --python "$VENV/bin/python" -r "$BUILD/requirements.txt" \
    ${REFRESH:+--refresh-package "$REFRESH" --reinstall-package "$REFRESH"}
  echo "--- installed"
  /.isolate/uv pip freeze --python "$VENV/bin/python"
else
  PYTHONPATH=/.isolate/pip "$VENV/bin/python" -m pip install --no-input --progress-bar off \
    --disable-pip-version-check -r "$BUILD/requirements.txt"
  echo "--- installed"
  PYTHONPATH=/.isolate/pip "$VENV/bin/python" -m pip list --disable-pip-version-check \
    --format=freeze
fi
"""


def build_layer(spec: EnvSpec, rootfs: Path, plan: DepsPlan, index: IndexConfig,
                rootdir: Path, data: Path, log: Path, cache_root: Path,
                progress: Callable[[str], None],
                installer: tuple[str, str | None] = ("pip", None)) -> dict[str, Any]:
    """Build the layer into data (a fresh cache entry directory)."""
    from pytest_isolate.images.envvars import environment_variables
    from pytest_isolate.images.rootfs import run_logged
    from pytest_isolate.namespaces import launcher_argv

    venv = data / "venv"
    layer = data / "project"
    build = data / "build"
    work = data / "launch"
    for d in (venv, layer / "upper", layer / "work", build, work):
        d.mkdir(parents=True)
    (build / "requirements.txt").write_text("\n".join(plan.lines(rootdir)) + "\n")
    (build / "pip.conf").write_text(index.pip_conf)
    pip_cache = cache_root / "pip-cache"
    pip_cache.mkdir(parents=True, exist_ok=True)
    binds: list[list[Any]] = [
        [str(rootdir), str(rootdir), True], [str(venv), VENV, False],
        [str(layer), "/.isolate/layer", False], [str(build), _BUILD, True],
        [str(pip_cache), _PIP_CACHE, False],
    ]
    name, uv = installer
    if name == "uv" and uv is not None:
        binds.append([uv, "/.isolate/uv", True])
        if spec.foreign:
            binds += [[p, p, True] for p in host_runtime_binds(uv)]
    else:
        binds.append([host_pip(), f"{_PIP}/pip", True])
    binds += [[p, p, True] for p in index.paths]
    env = environment_variables(spec)
    env.update(index.env)
    env.update({"PYTHON": spec.option("python", "python3"), "VENV": VENV,
                "LAYER": "/.isolate/layer", "BUILD": _BUILD,
                "PROJECT": str(rootdir) if plan.package != "skip" else "",
                "REFRESH": plan.project or "" if plan.package != "skip" else "",
                "PIP_CONFIG_FILE": _PIP_CONF, "PIP_CACHE_DIR": _PIP_CACHE,
                "PIP_ROOT_USER_ACTION": "ignore", "INSTALLER": name})
    if name == "uv":
        env.update(index.uv_env())
        env.update({"UV_CACHE_DIR": f"{_PIP_CACHE}/uv", "UV_LINK_MODE": "copy",
                    "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"})
    if index.ca:
        binds.append([index.ca, _CA, True])
        env.update({"PIP_CERT": _CA, "SSL_CERT_FILE": _CA, "REQUESTS_CA_BUNDLE": _CA})
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    cfg = {"rootfs": str(rootfs), "workdir": str(work), "mode": "overlay", "binds": binds,
           "network": True, "hostname": "isolate-deps", "argv": ["/bin/sh", "-c", BUILD_SCRIPT],
           "env": env, "cwd": "/"}
    label = f"installing the dependencies of {spec.name!r} ({describe(plan)}; {name})"
    progress(f"{label}; log: {log}")
    try:
        run_logged(launcher_argv(cfg), log, progress, label)
    except ProvisionError as exc:
        keys = "; ".join(f"{k} from {v}" for k, v in plan.sources.items()
                         if v != "built-in default") or "package: the built-in default"
        first = str(exc).splitlines()[0]
        raise ProvisionError(f"{first}; the keys: {keys}", exc.log_tail, exc.log_path) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kept = prune_layer(layer / "upper")
    shutil.rmtree(layer / "work", ignore_errors=True)
    venv_pytest = None
    for info in sorted(venv.glob("lib/python*/site-packages/pytest-*.dist-info")):
        venv_pytest = info.name[len("pytest-"):-len(".dist-info")]
    return {"plan": describe(plan), "project_files": kept, "venv_pytest": venv_pytest}


def prune_layer(upper: Path) -> int:
    """Keep only compiled extensions of what the build wrote into the project tree."""
    kept = 0
    for dirpath, dirs, files in os.walk(upper, topdown=False):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and path.suffix in LAYER_SUFFIXES and not any(
                    part in SKIP_DIRS or part.endswith((".egg-info", ".dist-info"))
                    for part in path.relative_to(upper).parts[:-1]):
                kept += 1
                continue
            path.unlink()  # sources' copies, egg-info, whiteouts (character devices)
        for name in dirs:
            path = Path(dirpath) / name
            if path.is_symlink():
                path.unlink()
            elif not any(path.iterdir()):
                path.rmdir()
    return kept


def describe(plan: DepsPlan) -> str:
    parts = []
    if plan.package != "skip":
        extras = f"[{','.join(plan.extras)}]" if plan.extras else ""
        parts.append(f"{plan.project or 'the project'}{extras} ({plan.package})")
    parts += list(plan.requirements)
    return ", ".join(parts)


def provision_layer(spec: EnvSpec, rootfs_entry: Any, rootdir: Path, cache: Any,
                    log_path: Path, progress: Callable[[str], None],
                    plan: DepsPlan | None = None) -> DepsLayer | None:
    """The layer for spec on rootfs_entry, built when missing; None when nothing to install
    (plan: make_plan's answer, when the caller has it already)."""
    plan = plan or make_plan(spec, rootdir)
    if plan is None:
        return None
    index = host_index_config()
    installer = choose_installer(spec)
    key = layer_key(spec, rootfs_entry.key, plan, index, rootdir, installer[0])

    def builder(data: Path, log: Path) -> dict[str, Any]:
        return build_layer(spec, rootfs_entry.data, plan, index, rootdir, data, log,
                           cache.root, progress, installer)

    entry = cache.get_or_build("deps", key, builder,
                               {"env": spec.name, "rootfs": rootfs_entry.key,
                                "plan": describe(plan)}, log_path)
    upper = entry.data / "project" / "upper"
    has_project = upper.is_dir() and any(upper.iterdir())
    pinned = entry.manifest.get("venv_pytest")
    return DepsLayer(key, entry, entry.data / "venv", upper if has_project else None,
                     str(pinned) if pinned else None)
