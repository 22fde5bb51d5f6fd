"""What the pytest inside an environment is told: its arguments and the plugins it loads.

Pure functions of the host's configuration (no agent, no backend), so they are unit
tested on their own.

- The project's ``addopts`` are honoured inside, less what makes no sense there or is
  already passed from the host's parsed options (see DROPPED).
- The third-party plugins the host run has loaded (pytest11 entry points) are loaded
  inside with ``-p NAME`` when the environment has them installed (plugin autoload
  stays off inside, so nothing else sneaks in); HOST_ONLY plugins never are.
- ``-p NAME`` in addopts goes in too (but for HOST_ONLY plugins), and so does
  ``-p no:NAME`` given on the host's command line.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

#: Plugins that act on the host only: the host runs them for isolated tests (xdist spreads
#: the items, pytest-isolate binds them; rerunfailures reruns them on a clean state).
#: pytest-timeout's limit is enforced by the agent and coverage is measured by the agent
#: (see hostplugins.py), so neither runs inside.
HOST_ONLY = frozenset(("isolate", "xdist", "xdist.looponfail", "rerunfailures", "timeout",
                       "pytest_cov"))
#: Distributions whose plugins stay on the host (matched on the distribution's name).
HOST_ONLY_DISTS = frozenset(("pytest-isolate-env", "pytest-xdist", "pytest-rerunfailures",
                             "pytest-timeout", "pytest-cov"))

#: addopts that are dropped inside: option -> takes a value.  Reporting and files belong to
#: the host (JUnit, coverage data, the cache provider, reruns and timeouts of
#: hostplugins.py), distribution to xdist, our own
#: options to us; verbosity, traceback style, capture and import mode are passed from
#: the host's parsed options (so addopts would count twice).
DROPPED: dict[str, bool] = {
    "-n": True, "--numprocesses": True, "--dist": True, "--maxprocesses": True,
    "--max-worker-restart": True, "--tx": True, "--rsyncdir": True, "-d": False,
    "--looponfail": False, "-f": False,
    "--junitxml": True, "--junit-xml": True, "--junitprefix": True, "--junit-prefix": True,
    "--html": True, "--self-contained-html": False, "--resultlog": True,
    "--cov-report": True, "--cov-config": True, "--cov-fail-under": True,
    "--cov-append": False, "--cov-branch": False, "--cov-context": True, "--no-cov": False,
    "--no-cov-on-fail": False,
    "--timeout": True, "--timeout-method": True, "--timeout_method": True,
    "--timeout-disable-debugger-detection": False, "--session-timeout": True,
    "--reruns": True, "--reruns-delay": True, "--only-rerun": True, "--rerun-except": True,
    "--lf": False, "--last-failed": False, "--ff": False, "--failed-first": False,
    "--nf": False, "--new-first": False, "--sw": False, "--stepwise": False,
    "--sw-skip": False, "--stepwise-skip": False, "--cache-clear": False,
    "--lfnf": True, "--last-failed-no-failures": True,
    "-v": False, "--verbose": False, "-q": False, "--quiet": False, "--verbosity": True,
    "--tb": True, "--capture": True, "-s": False, "--import-mode": True, "-l": False,
    "--showlocals": False, "--rootdir": True, "-c": True, "--config-file": True,
    "-x": False, "--exitfirst": False, "--maxfail": True, "--pdb": False,
    "--pdbcls": True, "--trace": False, "--durations": True, "--durations-min": True,
    "-r": True, "--color": True, "--code-highlight": True, "--basetemp": True,
}


def _option_of(arg: str) -> tuple[str, bool]:
    """(option name, whether its value is attached) of one argument."""
    if arg.startswith("--"):
        name, eq, _ = arg.partition("=")
        return name, bool(eq)
    if arg.startswith("-") and len(arg) > 2:
        return arg[:2], True  # -n4, -rA, -pxdist
    return arg, False


def filter_addopts(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped) of the project's addopts for the pytest inside."""
    kept: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, attached = _option_of(arg)
        if name.startswith(("--isolate", "--cov")) and name not in DROPPED:
            # ours, or pytest-cov's --cov [SOURCE]: a value when one follows
            flag = name in ("--isolate-strict", "--isolate-keep-failed", "--cov-append",
                            "--cov-branch")
            takes = not (flag or attached) and i + 1 < len(args) and not args[i + 1].startswith("-")
            dropped += args[i:i + 1 + takes]
            i += 1 + takes
            continue
        if name == "-p":  # kept, but for plugins that stay on the host
            value = arg[2:] if attached else (args[i + 1] if i + 1 < len(args) else "")
            words = args[i:i + 1 + (not attached)]
            (dropped if value in HOST_ONLY else kept).extend(words)
            i += len(words)
            continue
        if name in DROPPED:
            takes = DROPPED[name] and not attached and i + 1 < len(args)
            dropped += args[i:i + 1 + takes]
            i += 1 + takes
            continue
        kept.append(arg)
        i += 1
    return kept, dropped


def disabled_plugins(args: Iterable[str]) -> list[str]:
    """Every ``-p no:NAME`` of args (the host's command line) as ["-p", "no:NAME", ...]."""
    out = []
    words = list(args)
    for i, arg in enumerate(words):
        value = None
        if arg == "-p" and i + 1 < len(words):
            value = words[i + 1]
        elif arg.startswith("-p") and len(arg) > 2:
            value = arg[2:]
        if value and value.startswith("no:") and value != "no:cacheprovider":
            out += ["-p", value]
    return out


def host_plugins(pluginmanager: Any) -> list[tuple[str, str]]:
    """(entry-point name, distribution) of every third-party plugin the host run loaded."""
    import importlib.metadata

    loaded = {name for name, _ in pluginmanager.list_name_plugin()}
    out: list[tuple[str, str]] = []
    for _, dist in pluginmanager.list_plugin_distinfo():
        project = str(getattr(dist, "project_name", "") or dist.metadata.get("Name", ""))
        if project.lower() in HOST_ONLY_DISTS:
            continue
        for ep in getattr(dist, "entry_points", ()) or ():
            if isinstance(ep, importlib.metadata.EntryPoint) and ep.group == "pytest11" and (
                    ep.name in loaded and ep.name not in HOST_ONLY):
                out.append((ep.name, project))
    return sorted(set(out))


def addopts_of(config: Any) -> list[str]:
    """The ini addopts as pytest reads them (a list of words)."""
    value = config.getini("addopts")
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value or ()]


def initial_paths(config: Any) -> list[str]:
    """What the host's pytest was given to collect, as absolute paths in the project (its
    root when none is there): a deferred pytest inside configures from them -- its initial
    conftests are the host's -- before the host knows the files it binds there."""
    rootdir = os.path.normpath(config.rootpath)
    out = []
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        full = os.path.normpath(os.path.join(config.invocation_params.dir, path))
        if os.path.commonpath([full, rootdir]) == rootdir and os.path.exists(full):
            out.append(full + sep + rest)
    return out or [rootdir]


def pytest_args(config: Any, files: Iterable[str], addopts: Sequence[str]) -> list[str]:
    """The arguments of the pytest inside (but for the host's plugins it has): files (the
    bound ones, or a deferred pytest's initial_paths), the project's addopts as filtered,
    and the host's options that shape collection and reports."""
    rootdir = config.rootpath
    opt = config.option
    args = [str(rootdir / f) for f in files]
    args += ["-p", "no:cacheprovider", "-o", "addopts=" + shlex.join(addopts),
             "--rootdir", str(rootdir),
             f"--tb={opt.tbstyle}", f"--capture={opt.capture}",
             f"--import-mode={opt.importmode}", "-W", "ignore::pytest.PytestConfigWarning"]
    if config.inipath is not None:
        args += ["-c", str(config.inipath)]
    verbose = int(opt.verbose or 0)
    args += ["-v"] * verbose if verbose > 0 else ["-q"] * -verbose
    if opt.showlocals:
        args.append("-l")
    args += doctest_args(opt)
    args += disabled_plugins(config.invocation_params.args)
    return args


def doctest_args(opt: Any) -> list[str]:
    """The host's doctest options, for the pytest inside to collect the same doctest items
    (``-o addopts=`` there drops what addopts gave the host)."""
    args = ["--doctest-modules"] if getattr(opt, "doctestmodules", False) else []
    for pattern in getattr(opt, "doctestglob", None) or []:
        args.append(f"--doctest-glob={pattern}")
    if getattr(opt, "doctestreport", "udiff") != "udiff":
        args.append(f"--doctest-report={opt.doctestreport}")
    for flag in ("doctest_ignore_import_errors", "doctest_continue_on_failure"):
        if getattr(opt, flag, False):
            args.append("--" + flag.replace("_", "-"))
    return args
