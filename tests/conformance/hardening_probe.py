"""What a test in a container backend must be refused (issue 11), as a probe and a verdict.

PROBE is Python source (3.9+, stdlib only) run inside an environment: as a script
(``python3 -c PROBE`` through ``Environment.run``) it prints a JSON object; in a
generated test file it defines ``probe()``.  It never changes anything that outlives
the environment even where a refusal is missing: kernel settings get the value just
read written back, /proc/sysrq-trigger is opened but never written, and the syscalls it
tries only act on the calling process (a namespace of its own, a tmpfs in its own mount
namespace, a key-ring id, a NULL module image).

refusals(result) lists what was not refused, so a failing assert names every gap.
"""

from __future__ import annotations

from typing import Any

#: Docker's default capability set as a mask (CapBnd of `docker run debian`)
DOCKER_DEFAULT_CAPS = 0x00000000A80425FB
CAP_SYS_ADMIN = 1 << 21

#: kernel settings that outlive the environment: writing them back must be refused
SETTINGS = ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/overcommit_memory",
            "/proc/sys/kernel/panic", "/proc/irq/default_smp_affinity")
#: masked: reads come back empty (or are refused)
MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list")

PROBE = r'''
import ctypes, errno, json, os, platform

SETTINGS = @SETTINGS@
MASKED = @MASKED@

def _errname(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))

def _write_back(path):
    """Write back the value read: the write itself must be refused."""
    try:
        with open(path, "rb") as f:
            old = f.read()
    except OSError as exc:
        return "read " + _errname(exc)
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return _errname(exc)
    try:
        os.write(fd, old)
    except OSError as exc:
        return _errname(exc)
    finally:
        os.close(fd)
    return "written"

def _open_for_write(path):
    try:
        os.close(os.open(path, os.O_WRONLY))  # never written: that would act
    except OSError as exc:
        return _errname(exc)
    return "opened"

def _read_size(path):
    try:
        with open(path, "rb") as f:
            return len(f.read(4096))
    except OSError as exc:
        return _errname(exc)

def probe(admin=False):
    res = {"uid": os.getuid()}
    with open("/proc/self/uid_map") as f:  # [inside, host, count] of the first range
        res["uid_map"] = f.read().split()[:3]
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        res[key] = int(status.get(key, "0"), 16)
    res["NoNewPrivs"] = status.get("NoNewPrivs")
    res["Seccomp"] = status.get("Seccomp")
    res["settings"] = {p: _write_back(p) for p in SETTINGS if os.path.exists(p)}
    res["sysrq"] = _open_for_write("/proc/sysrq-trigger")
    res["masked"] = {p: _read_size(p) for p in MASKED if os.path.exists(p)}
    res["sys_read_only"] = bool(os.statvfs("/sys").f_flag & os.ST_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    def call(fn, *args):
        ctypes.set_errno(0)
        ret = fn(*args)
        return "ok" if ret != -1 else errno.errorcode.get(ctypes.get_errno(), "?")
    if not admin:  # a zygote may do these: it must not, to itself
        res["unshare_user"] = call(libc.unshare, 0x10000000)
        res["unshare_mount"] = call(libc.unshare, 0x00020000)
        target = "/tmp/isolate-hardening-probe"
        os.makedirs(target, exist_ok=True)
        res["mount"] = call(libc.mount, b"none", target.encode(), b"tmpfs", ctypes.c_ulong(0),
                            None)
    nrs = {"x86_64": {"keyctl": 250, "clone3": 435, "init_module": 175},
           "aarch64": {"keyctl": 219, "clone3": 435, "init_module": 105}}.get(platform.machine())
    if nrs is not None:
        sysc = libc.syscall
        # KEYCTL_GET_KEYRING_ID of the user keyring, create=0: a read
        res["keyctl"] = call(sysc, ctypes.c_long(nrs["keyctl"]), ctypes.c_long(0),
                             ctypes.c_long(-4), ctypes.c_long(0))
        res["clone3"] = call(sysc, ctypes.c_long(nrs["clone3"]), None, ctypes.c_long(0))
        res["init_module"] = call(sysc, ctypes.c_long(nrs["init_module"]), None,
                                  ctypes.c_long(0), b"")
    return res

if __name__ == "__main__":
    print(json.dumps(probe()))
'''.replace("@SETTINGS@", repr(SETTINGS)).replace("@MASKED@", repr(MASKED))


def refusals(result: dict[str, Any], admin: bool = False) -> list[str]:
    """What the probe found allowed that must be refused (empty: all refused).

    admin: the probe ran in a zygote (session/module fixtures), which keeps
    CAP_SYS_ADMIN and the syscalls it needs to build each test worker's root (the
    probe leaves out what it would do to the zygote itself: unshare, mount).
    """
    gaps = []
    allowed_caps = DOCKER_DEFAULT_CAPS | (CAP_SYS_ADMIN if admin else 0)
    for key in ("CapBnd", "CapPrm", "CapEff"):
        if result[key] & ~allowed_caps:
            gaps.append(f"{key} {result[key]:#x} has more than {allowed_caps:#x}")
    for key in ("CapInh", "CapAmb"):
        if result[key]:
            gaps.append(f"{key} is {result[key]:#x}, not empty")
    if result["NoNewPrivs"] != "1":
        gaps.append(f"NoNewPrivs is {result['NoNewPrivs']}")
    if result["Seccomp"] != "2":
        gaps.append(f"Seccomp is {result['Seccomp']} (2: a filter)")
    for path, outcome in result["settings"].items():
        if outcome == "written":
            gaps.append(f"{path} could be written")
    if result["sysrq"] == "opened":
        gaps.append("/proc/sysrq-trigger could be opened for writing")
    for path, size in result["masked"].items():
        if size not in (0, "EACCES", "EPERM"):
            gaps.append(f"{path} is not masked ({size} bytes read)")
    if not result["sys_read_only"]:
        gaps.append("/sys is writable")
    for key in ("unshare_user", "unshare_mount", "mount", "keyctl", "init_module"):
        if result.get(key, "EPERM") == "ok":
            gaps.append(f"{key} was allowed")
    if not admin and result.get("clone3", "ENOSYS") != "ENOSYS":
        gaps.append(f"clone3 gave {result['clone3']}, not ENOSYS (the filter's answer)")
    return gaps
