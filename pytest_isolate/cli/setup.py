"""``setup``: install and start what the backends need (the planning and doing live in
setup_host.py)."""

from __future__ import annotations

import argparse
import sys
import time

from pytest_isolate.cli.common import PROG, Project, UsageError, out, resolve_specs


def split_list(value: str | None) -> list[str] | None:
    return [v for v in (value or "").replace(" ", ",").split(",") if v] or None


def cmd_setup(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate import setup_host
    from pytest_isolate.spec import host_arch

    specs = resolve_specs(project)
    try:
        request = setup_host.select(
            specs, list(project.table.get("envs", {}) or {}), backends=split_list(args.backends),
            envs=split_list(args.envs), arches=split_list(args.arches) or (), user=args.user,
            packages=not args.no_packages, host_arch=host_arch())
    except setup_host.SetupError as exc:
        raise UsageError(str(exc)) from None
    started = time.monotonic()
    state = setup_host.gather_state(request)
    plan = setup_host.plan(request, state)
    prefix = setup_host.sudo_prefix(state)
    arches = setup_host.foreign_arches(request, state)
    out(f"setup for {', '.join(request.backends)} ({request.why})"
        + (f"; foreign architectures: {', '.join(arches)}" if arches else "")
        + (f"; rootless user: {request.user}" if request.user else ""))
    for note in plan.notes:
        out(f"note: {note}")
    if args.dry_run or plan.problems:
        if plan.empty and not plan.problems:
            out("nothing to do: everything is in place")
        for step in plan.steps:
            out(f"# {step.reason}")
            out(step.shell(prefix))
        for problem in plan.problems:
            sys.stderr.write(f"{PROG}: error: {problem}\n")
        return 2 if plan.problems else 0
    if plan.empty:
        out(f"nothing to do: everything is in place ({time.monotonic() - started:.1f}s)")
        return 0
    if prefix:
        out(f"not running as root: the commands run through {prefix[0]}")
    try:
        setup_host.execute(plan.steps, prefix, out)
    except setup_host.SetupError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    left = setup_host.plan(request, setup_host.gather_state(request))
    if not left.empty:
        sys.stderr.write(f"{PROG}: error: still not in place after setup: "
                         + "; ".join(s.reason for s in left.steps) + "\n")
        return 1
    out(f"done in {time.monotonic() - started:.1f}s")
    return 0
