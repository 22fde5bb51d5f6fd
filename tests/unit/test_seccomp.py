"""The seccomp allow-list of the worker hardening (agent.harden.seccomp_program), issue 11.

The program is run through a small classic-BPF interpreter here, syscall by syscall,
and loaded into the kernel in a forked child to see the kernel agree.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

import pytest

from pytest_isolate.agent import harden as agent

MACHINES = sorted(agent.SYSCALL_NUMBERS)
ALLOW = agent.SECCOMP_RET_ALLOW
EPERM = agent.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = agent.SECCOMP_RET_ERRNO | errno.ENOSYS


def run_bpf(prog: list[agent.BpfInsn], arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """What the kernel's classic-BPF interpreter returns for struct seccomp_data."""
    full = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *full)
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == agent.BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == agent.BPF_RET:
            return k
        elif code == agent.BPF_AND:
            acc &= k
        else:
            taken = {agent.BPF_JEQ: acc == k, agent.BPF_JGT: acc > k, agent.BPF_JGE: acc >= k,
                     agent.BPF_JSET: bool(acc & k)}[code]
            pc += jt if taken else jf


def decide(machine: str, name: str, *args: int, admin: bool = False) -> int:
    prog = agent.seccomp_program(machine, admin)
    return run_bpf(prog, agent.AUDIT_ARCH[machine], agent.syscall_numbers(machine)[name], args)


@pytest.mark.parametrize("machine", MACHINES)
def test_every_allowed_syscall_is_allowed_and_nothing_else(machine: str) -> None:
    nrs = agent.syscall_numbers(machine)
    prog = agent.seccomp_program(machine)
    arch = agent.AUDIT_ARCH[machine]
    allowed = {n for n in agent.SECCOMP_ALLOW if n in nrs}
    assert {"read", "openat", "execve", "wait4", "rseq", "statx", "mmap"} <= allowed
    for name, nr in nrs.items():
        if name in agent.SECCOMP_SPECIAL:
            continue
        want = ALLOW if name in allowed else EPERM
        assert run_bpf(prog, arch, nr) == want, name
    # numbers no table names (a newer kernel's syscalls): refused
    assert run_bpf(prog, arch, 999) == EPERM


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("name", ["mount", "umount2", "unshare", "setns", "pivot_root",
                                  "init_module", "finit_module", "delete_module", "kexec_load",
                                  "reboot", "keyctl", "add_key", "request_key", "swapon",
                                  "acct", "settimeofday", "clock_settime", "bpf", "syslog",
                                  "perf_event_open", "open_tree", "move_mount", "fsopen"])
def test_what_docker_refuses_is_refused(machine: str, name: str) -> None:
    if name not in agent.syscall_numbers(machine):
        pytest.skip(f"{name} does not exist on {machine}")
    assert decide(machine, name) == EPERM


@pytest.mark.parametrize("machine", MACHINES)
def test_arguments_are_judged(machine: str) -> None:
    assert decide(machine, "clone", 0x11) == ALLOW  # SIGCHLD: fork
    assert decide(machine, "clone", 0x003D0F00) == ALLOW  # pthread_create's flags
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                 0x40000000):
        assert decide(machine, "clone", 0x11 | flag) == EPERM, hex(flag)
    assert decide(machine, "clone3") == ENOSYS  # libc falls back to clone
    assert decide(machine, "socket", 2, 1) == ALLOW  # AF_INET
    assert decide(machine, "socket", 1, 1) == ALLOW  # AF_UNIX
    assert decide(machine, "socket", 40, 1) == EPERM  # AF_VSOCK
    for persona in agent.PERSONALITY_ALLOWED:
        assert decide(machine, "personality", persona) == ALLOW
    assert decide(machine, "personality", 0x0400000) == EPERM  # READ_IMPLIES_EXEC


@pytest.mark.parametrize("machine", MACHINES)
def test_the_zygote_filter_allows_building_roots(machine: str) -> None:
    for name in ("mount", "umount2", "unshare", "pivot_root", "clone3"):
        assert decide(machine, name, admin=True) == ALLOW, name
    assert decide(machine, "clone", 0x20020011, admin=True) == ALLOW
    for name in ("init_module", "keyctl", "reboot", "kexec_load"):
        assert decide(machine, name, admin=True) == EPERM, name


@pytest.mark.parametrize("machine", MACHINES)
def test_other_abis_are_refused(machine: str) -> None:
    prog = agent.seccomp_program(machine)
    nr_read = agent.syscall_numbers(machine)["read"]
    assert run_bpf(prog, 0x40000003, nr_read) == EPERM  # i386
    assert run_bpf(prog, 0x40000028, nr_read) == EPERM  # arm
    if machine == "x86_64":  # x32: the same arch value, the syscall bit set
        assert run_bpf(prog, agent.AUDIT_ARCH[machine], 0x40000000 | nr_read) == EPERM


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("admin", [False, True])
def test_program_fits_the_kernel(machine: str, admin: bool) -> None:
    prog = agent.seccomp_program(machine, admin)
    assert len(prog) < 4096  # BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(prog):
        assert 0 <= jt < 256 and 0 <= jf < 256 and 0 <= k < 1 << 32
        if code not in (agent.BPF_RET, agent.BPF_LD_W_ABS, agent.BPF_AND):
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1] == (agent.BPF_RET, 0, 0, EPERM)


@pytest.mark.skipif(platform.machine() not in agent.SYSCALL_NUMBERS,
                    reason="no syscall table for this machine")
def test_the_kernel_loads_and_enforces_it() -> None:
    """In a forked child: the filter loads, allowed calls work, refused ones get EPERM."""
    nrs = agent.syscall_numbers(platform.machine())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        result = []
        try:
            assert agent._prctl(agent.PR_SET_NO_NEW_PRIVS, 1) == 0
            agent.install_seccomp(agent.seccomp_program(platform.machine()))
            libc = ctypes.CDLL(None, use_errno=True)
            result.append(str(os.getpid() > 0))
            for name, args in (("keyctl", (0, -4, 0)), ("unshare", (0x10000000,)),
                               ("clone3", (0, 0))):
                ctypes.set_errno(0)
                ret = libc.syscall(ctypes.c_long(nrs[name]), *[ctypes.c_long(a) for a in args])
                result.append(f"{name}={ret}/{errno.errorcode.get(ctypes.get_errno())}")
            with open(os.devnull) as f:
                result.append(str(f.read() == ""))
            with open("/proc/self/status") as f:
                status = f.read()
            result.append("yes" if "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
                          else "no")
        except BaseException as exc:
            result.append(repr(exc))
        os.write(w, " ".join(str(x) for x in result).encode())
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert out.decode().split() == ["True", "keyctl=-1/EPERM", "unshare=-1/EPERM",
                                    "clone3=-1/ENOSYS", "True", "yes"]
