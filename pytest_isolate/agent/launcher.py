"""The host side of the namespace backends, never shipped inside: enter new namespaces,
build the environment's root (an overlay over the cached root filesystem, binds, a fresh
/dev and /proc), pivot into it and exec the environment's python3 (which then runs the
agent's ``BOOTSTRAP``).

The host runs it on its own Python without site and without importing pytest_isolate
(bundle.launcher_argv): ``python3 -I -S -c LOADER AGENT_DIR launch CONFIG_JSON``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Dict, Optional, Sequence

from .mounts import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MS_BIND,
    MS_PRIVATE,
    MS_REC,
    ROOT_MAP_ENV,
    attach_tree,
    bind,
    enter_userns,
    hand_over,
    idmapped_tree,
    loopback_up,
    make_userns,
    mount,
    overlay,
    pivot_root,
    populate_root,
    set_pdeathsig,
    size_opt,
    unshare,
)
from .wire import DEFAULT_PATH


def launch(cfg: Dict[str, Any]) -> None:
    """Enter new namespaces, build the environment's root, pivot into it and exec.

    cfg keys: rootfs, workdir, mode ("overlay": writes go to a tmpfs;
    "direct": writes go to rootfs itself, for provisioning), binds
    [[src, dst, readonly]], network, hostname, argv, env, cwd, new_session
    (default true; false keeps the caller's terminal for an interactive shell),
    disk (bytes: the size of the writable tmpfs mounts; unbounded when absent),
    userns ({"uid": [base, count], "gid": [base, count]}, as root and in overlay mode:
    root inside is host uid base -- see make_userns).
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC
    if not cfg.get("network"):
        flags |= CLONE_NEWNET
    if uid != 0:
        flags |= CLONE_NEWUSER
    set_pdeathsig()
    mapped = cfg.get("userns") if uid == 0 and cfg.get("mode", "overlay") == "overlay" else None
    userns_fd = lower_fd = None
    if mapped:
        try:
            userns_fd = make_userns(mapped["uid"], mapped["gid"])
            # the root filesystem seen through the mapping, attached in _enter_root
            lower_fd = idmapped_tree(cfg["rootfs"], userns_fd, readonly=True, recursive=False)
        except OSError as exc:
            # no user namespaces or no idmapped mounts here: the host's root, and the
            # agent's hello says why (the host reports it once)
            if userns_fd is not None:
                os.close(userns_fd)
            userns_fd, mapped = None, None
            cfg.setdefault("env", {})[ROOT_MAP_ENV] = str(exc)
    unshare(flags)
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid),
                           ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    pid = os.fork()
    if pid:
        def forward(signum: int, frame: Any) -> None:
            os.kill(pid, signal.SIGKILL)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, forward)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                os._exit(1)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    try:
        set_pdeathsig()
        if cfg.get("new_session", True):
            # the environment shares no process group with the host's launcher; not for an
            # interactive program, which must keep its terminal (job control, Ctrl-C)
            os.setsid()
        _enter_root(cfg, userns_fd, mapped, lower_fd)
    except BaseException as exc:  # reported on the launcher's stderr (the env's log)
        sys.stderr.write("pytest-isolate launcher: %s: %s\n" % (type(exc).__name__, exc))
        sys.stderr.flush()
        os._exit(121)


def _enter_root(cfg: Dict[str, Any], userns_fd: Optional[int] = None,
                mapped: Optional[Dict[str, Any]] = None,
                lower_fd: Optional[int] = None) -> None:
    work = cfg["workdir"]
    mount("tmpfs", work, "tmpfs", 0, "mode=755" + size_opt(cfg.get("disk")))
    root = os.path.join(work, "root")
    upper = os.path.join(work, "upper")
    owner = (mapped["uid"][0], mapped["gid"][0]) if mapped else None
    if cfg.get("mode", "overlay") == "direct":
        os.makedirs(root)
        mount(cfg["rootfs"], root, None, MS_BIND | MS_REC)
    else:
        lower = cfg["rootfs"]
        if lower_fd is not None:
            # the cached root filesystem stays owned by the host's root on disk; seen
            # through this mount, the mapped root owns it
            lower = os.path.join(work, "lower")
            os.makedirs(lower)
            attach_tree(lower_fd, lower)
        overlay(root, [lower], upper, os.path.join(work, "work"))
        bind(lower, root + "/.isolate/lower", readonly=True)  # a bind keeps the idmap
        os.makedirs(root + "/.isolate/ws", exist_ok=True)
    binds = list(cfg.get("binds", []))
    if cfg.get("network") and os.path.exists("/etc/resolv.conf"):
        binds.append(["/etc/resolv.conf", "/etc/resolv.conf", True])
    populate_root(root, binds, "/dev", fresh_dev=True, size=cfg.get("disk"),
                  userns_fd=userns_fd, owner=owner)
    if owner is not None:
        hand_over(root, upper, owner)
    if cfg.get("hostname"):
        socket.sethostname(cfg["hostname"])
    if not cfg.get("network"):
        try:
            loopback_up()
        except OSError:
            pass
    pivot_root(root)
    if userns_fd is not None:
        enter_userns(userns_fd)
        # a mount namespace the mapped root owns: the agent mounts (the project layer),
        # what the host's root mounted above stays locked in place
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.chdir(cfg.get("cwd") or "/")
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    env.update(cfg.get("env") or {})
    argv = cfg["argv"]
    os.execvpe(argv[0], argv, env)


def probe_root_map(path: str, uid_map: Sequence[int], gid_map: Sequence[int]) -> None:
    """Can a root filesystem at path be run with a mapped root here?  Raises OSError
    with the reason (``probe-root-map``, for `pytest-isolate doctor`; a start does
    not probe: the launcher tries, and falls back with the reason)."""
    fd = make_userns(uid_map, gid_map)
    try:
        os.close(idmapped_tree(path, fd, readonly=True, recursive=False))
    finally:
        os.close(fd)


def main(argv: Sequence[str]) -> int:
    """``launch CONFIG_JSON`` or ``probe-root-map PATH [UID_MAP, GID_MAP]``."""
    if len(argv) >= 2 and argv[0] == "launch":
        launch(json.loads(argv[1]))
    elif len(argv) >= 3 and argv[0] == "probe-root-map":
        try:
            probe_root_map(argv[1], *json.loads(argv[2]))
        except OSError as exc:
            sys.stderr.write("%s\n" % exc)
            return 1
    else:
        sys.stderr.write("usage: launcher launch CONFIG_JSON | probe-root-map PATH MAPS_JSON\n")
        return 2
    return 0
