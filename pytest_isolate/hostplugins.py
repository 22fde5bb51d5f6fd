"""Host plugins people run with, applied to isolated tests.

Registered as "isolate-hostplugins" next to the manager.  Each bridge reads the plugin's
own settings for an item through that plugin's functions, so its markers, options and ini
keys keep their meaning; nothing is imported unless the plugin is loaded.

- pytest-rerunfailures (``--reruns N``, ``@pytest.mark.flaky``): an isolated test that
  failed runs again, each attempt in a fresh worker (a clean state), the failed attempts
  reported as "rerun" exactly as the plugin reports them.
- pytest-timeout (``--timeout``, ``@pytest.mark.timeout``, ``timeout`` ini): the limit
  applies to the test inside its environment; the host's timer is not started for an
  isolated test, so building or starting an environment never counts against it.
- pytest-cov (``--cov``): coverage is measured inside each environment (collection in the
  agent, each test in its worker, with the host's coverage package shipped in), brought
  back at the end of the test loop and combined by pytest-cov with the host's data: the
  project sits at the same path inside, so the report shows the host's paths.
- --pdb: on a terminal (and without xdist), a test's breakpoint() and the post-mortem of its
  failure open pdb inside its worker, relayed to this terminal (agent.Debugger).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _pytest.reports import TestReport

from pytest_isolate.agent.wire import message
from pytest_isolate.keys import ENV_KEY, MANAGER

Log = Callable[[TestReport], None]


def _isolated(item: pytest.Item) -> bool:
    return ENV_KEY in item.stash


# ---------------------------------------------------------------- pytest-rerunfailures

def reruns_of(item: pytest.Item) -> tuple[int, float] | None:
    """(reruns, delay) pytest-rerunfailures asks for this item; None when it asks none."""
    plugin = item.config.pluginmanager.get_plugin("rerunfailures")
    if plugin is None:
        return None
    excluded = getattr(plugin, "_is_rerun_path_excluded", None)
    if excluded is not None and excluded(item):
        return None
    count = plugin.get_reruns_count(item)
    if not count:
        return None
    delay = float(plugin.get_reruns_delay(item) or 0)
    return int(count), max(delay, 0.0)


def run_with_reruns(item: pytest.Item, reruns: int, delay: float,
                    attempt: Callable[[Log], None]) -> None:
    """Run attempt (one isolated run of item, reporting through the Log it is given) until
    it passes or the reruns are used up; the failed attempts' failures become "rerun"."""
    for n in range(reruns + 1):
        reports: list[TestReport] = []
        attempt(reports.append)
        item.execution_count = n + 1  # type: ignore[attr-defined]
        failed = any(r.failed for r in reports)
        final = n == reruns or not failed or any(hasattr(r, "wasxfail") for r in reports)
        for rep in reports:
            rep.rerun = n  # type: ignore[attr-defined]
            if not final and rep.failed:
                rep.outcome = "rerun"  # type: ignore[assignment]
            item.ihook.pytest_runtest_logreport(report=rep)
        if final:
            return
        if delay:
            time.sleep(delay)


# ---------------------------------------------------------------- pytest-timeout

def timeout_of(item: pytest.Item) -> float | None:
    """The limit pytest-timeout sets for item (marker > option > ini), if any."""
    plugin = item.config.pluginmanager.get_plugin("timeout")
    settings_of = getattr(plugin, "_get_item_settings", None)
    if settings_of is None:
        return None
    timeout = settings_of(item).timeout
    return float(timeout) if timeout else None


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """No host timer for an isolated test: the agent enforces its limit inside."""
    return True if _isolated(item) else None


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    return True if _isolated(item) else None


# ---------------------------------------------------------------- pytest-cov

def coverage_options(config: pytest.Config) -> dict[str, Any] | None:
    """What the agent needs to measure like the host's pytest-cov; None without --cov."""
    plugin = config.pluginmanager.get_plugin("_cov")
    controller = getattr(plugin, "cov_controller", None)
    if controller is None:
        return None
    return {"source": list(controller.cov_source or []), "branch": controller.cov_branch,
            "config": controller.cov_config if isinstance(controller.cov_config, str) else None}


def coverage_data_dir(config: pytest.Config) -> Path | None:
    """The directory whose .coverage.* files pytest-cov combines at the end of the loop."""
    plugin = config.pluginmanager.get_plugin("_cov")
    controller = getattr(plugin, "cov_controller", None)
    cov = getattr(controller, "cov", None)
    if cov is None:
        return None
    data_file = Path(cov.config.data_file)
    if not data_file.is_absolute():
        data_file = Path(getattr(controller, "topdir", None) or Path.cwd()) / data_file
    return data_file.parent


def collect_coverage(conn: Any, dest: Path, env: str) -> int:
    """Bring the coverage data files an environment wrote into dest (where pytest-cov
    combines them); only regular files named .coverage.* are taken from its archive."""
    _, blob = conn.call(0, message("coverage"), timeout=120)
    if not blob:
        return 0
    taken = 0
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if not (member.isfile() and name.startswith(".coverage.")):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target = dest / f".coverage.isolate-{env}.{name[len('.coverage.'):]}"
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            taken += 1
    return taken


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    """Inside pytest-cov's wrapper: the environments' data joins the host's before it
    combines and reports."""
    result = yield
    config = session.config
    dest = coverage_data_dir(config)
    if dest is None:
        return result
    manager = config.pluginmanager.get_plugin(MANAGER)
    if manager is None:
        return result
    for name, inst in list(manager.pool.instances.items()):
        if not getattr(inst, "pytest_started", False) or not inst.alive():
            continue
        try:
            collect_coverage(inst.conn, dest, name)
        except Exception as exc:  # never lose the run over coverage
            manager.progress(f"{name}: could not bring its coverage data back: {exc}")
    return result


# ---------------------------------------------------------------- --pdb

def debug_inside(config: pytest.Config) -> bool:
    """--pdb reaches into environments: on a terminal, without xdist."""
    return bool(config.getoption("usepdb", False)) and _has_terminal() and (
        os.environ.get("PYTEST_XDIST_WORKER") is None)


def _has_terminal() -> bool:
    """A controlling terminal (stdin itself is /dev/null while pytest captures)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def relay_debugger(config: pytest.Config, conn: Any, ch: int,
                   other: Callable[[dict[str, Any], bytes], bool]) -> None:
    """The debugger a test opened inside, on this terminal, until the test ends; the
    test's other frames (its reports) go to other meanwhile."""
    from pytest_isolate.interactive import relay

    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep(">", "pdb inside the environment (continue or quit to go on)")
    if capture is not None:  # the terminal's input too, as pytest's own --pdb does
        capture.suspend_global_capture(in_=True)
    try:
        relay(conn, ch, other=other)
    finally:
        if capture is not None:
            capture.resume_global_capture()


def pytest_collection_finish(session: pytest.Session) -> None:
    """--pdb without a terminal (or under xdist) cannot reach inside: say so once, before
    anything runs (never a hang: inside, a debugger reads an empty stdin and the test ends
    with BdbQuit)."""
    config = session.config
    if not config.getoption("usepdb", False) or debug_inside(config):
        return
    manager = config.pluginmanager.get_plugin(MANAGER)
    if manager is not None and manager.pool.bound:
        manager.progress(
            "--pdb needs a terminal and no xdist to debug an isolated test inside its "
            "environment: here an isolated test that fails is not debugged (a breakpoint() "
            "inside ends it with BdbQuit); --isolate-keep-failed keeps its environment")
