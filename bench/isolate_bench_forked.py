"""A pytest plugin that bench/run.py loads into a *local* run (``-p isolate_bench_forked``):
each test runs in a fork of the pytest process, and nothing else -- no namespace, mount,
overlay, hardening, agent or second process to relay through.

This is the floor of any design that gives each test a process of its own by forking one
that has imported pytest and collected the tests (the zygote's design, and
pytest-forked's): the kernel's fork, the copy-on-write faults of the test's own run and
the exit, plus the reports serialised over a pipe, as the agent sends them.  The
collector's objects are frozen before the fork (gc.freeze), as the zygote's are, so that
a collection in the child copies no page of the parent's.  Table 2 of
bench/run.py shows it beside the local run and the backends (issue 13's per-test target).
"""

from __future__ import annotations

import gc
import os
import pickle
from typing import Any

import pytest
from _pytest.runner import runtestprotocol


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: Any, nextitem: Any) -> bool:
    hook = item.ihook
    config = item.config
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    read, write = os.pipe()
    gc.freeze()
    pid = os.fork()
    if pid == 0:  # the test's process: run it, send its reports, end without clean-up
        code = 1
        try:
            os.close(read)
            reports = runtestprotocol(item, log=False, nextitem=nextitem)
            data = pickle.dumps([config.hook.pytest_report_to_serializable(config=config, report=r)
                                 for r in reports])
            with os.fdopen(write, "wb") as f:
                f.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"the forked test process of {item.nodeid} ended with status {status}")
    for serialized in pickle.loads(data):
        report = config.hook.pytest_report_from_serializable(config=config, data=serialized)
        hook.pytest_runtest_logreport(report=report)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
