"""``shell ENV``: a debugging shell (or a command) inside an environment."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_isolate.cli.common import (
    Project,
    UsageError,
    cache_location,
    load_backend,
    open_cache,
    resolve_specs,
    stderr_progress,
)

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend
    from pytest_isolate.spec import EnvSpec


def shell_backend(args: argparse.Namespace, project: Project, spec: EnvSpec,
                  backend_class: type[Backend]) -> tuple[Backend, Path]:
    """A checked backend in a run of its own and that run's directory (removed after the
    shell), its owner recorded (what `cache gc` and the leftover reapers judge it by)."""
    from pytest_isolate.backends.base import RunContext
    from pytest_isolate.ownership import RunId, record_run

    root, where = cache_location(args, project)
    cache = open_cache(root, where)
    run_id = str(RunId.create("shell"))
    base = cache.root / "runs" / run_id
    record_run(base)
    ctx = RunContext(run_id=run_id, rootdir=project.rootdir, cache=cache, log_dir=base / "logs",
                     work_dir=base / "work", progress=stderr_progress)
    backend = backend_class(ctx)
    backend.check(spec)
    return backend, base


def cmd_shell(args: argparse.Namespace, project: Project) -> int:
    import shutil

    from pytest_isolate import config
    from pytest_isolate.backends.base import SITE, standard_mounts
    from pytest_isolate.images.envvars import environment_variables
    from pytest_isolate.namespaces import launcher_argv

    specs = resolve_specs(project)
    config.check_env_names([args.env], "shell", specs)
    spec = specs[args.env]
    if spec.backend != "chroot":
        return shell_through_agent(args, project, spec)
    from pytest_isolate.backends.chroot import ChrootBackend

    backend, base = shell_backend(args, project, spec, ChrootBackend)
    entry = backend.provision(spec)
    rootdir = str(project.rootdir)
    # what a test sees; a project at / is not bound over the environment's own root
    binds: list[list[Any]] = [[m.src, m.dst, m.readonly]
                              for m in standard_mounts(backend.run, spec, entry) if m.dst != "/"]
    has_bash = (entry.data / "usr/bin/bash").exists() or (entry.data / "bin/bash").is_file()
    argv = list(args.argv) if args.argv else ["/bin/bash" if has_bash else "/bin/sh"]
    env = environment_variables(spec, pycache=True)
    env.update({"PYTHONPATH": SITE, "debian_chroot": f"isolate:{spec.name}",
                "TERM": os.environ.get("TERM", "dumb")})
    workdir = base / "work" / f"{spec.name}-shell"
    workdir.mkdir(parents=True)
    cfg = {"rootfs": str(entry.data), "workdir": str(workdir), "mode": "overlay", "binds": binds,
           "network": spec.network, "hostname": f"isolate-{spec.name}"[:63], "argv": argv,
           "env": env, "cwd": rootdir, "new_session": False}
    if sys.stdin.isatty():
        stderr_progress(f"shell in a fresh {spec.summary()}; changes are discarded on exit")
    # Ctrl-C belongs to the shell.  A no-op handler, not SIG_IGN: an ignored signal would
    # stay ignored through exec in the shell and every command it runs.
    # SIGTERM / SIGHUP end the instance (the launcher kills everything inside), then we clean up.
    proc: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: Any) -> None:
        if proc is not None:
            proc.terminate()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, lambda signum, frame: None), (signal.SIGTERM, stop),
                 (signal.SIGHUP, stop))}
    try:
        proc = subprocess.Popen(launcher_argv(cfg))
        code = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(base, ignore_errors=True)
    return code if code >= 0 else 128 - code


def shell_through_agent(args: argparse.Namespace, project: Project, spec: Any) -> int:
    """shell for any backend: a fresh instance, a terminal relayed over the agent protocol."""
    import shutil

    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.environment import Environment

    if spec.backend not in BUILTIN_BACKENDS:
        raise UsageError(f"shell: backend {spec.backend!r} of environment {spec.name!r} is not "
                         "a built-in one; use its own tools")
    backend_class, why = load_backend(spec.backend)
    if backend_class is None:
        raise UsageError(f"shell: backend {spec.backend!r} {why}")
    backend, base = shell_backend(args, project, spec, backend_class)
    instance = backend.start(spec, backend.provision(spec))
    try:
        env = Environment(instance)
        if sys.stdin.isatty():
            stderr_progress(f"shell in a fresh {spec.summary()}; changes are discarded on exit")
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            return env.shell(list(args.argv) or None, cwd=str(project.rootdir))
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)
