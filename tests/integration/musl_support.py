"""A musl-based root filesystem for the image tests, made without Alpine's mirrors (out
of reach here): CPython (with libffi, for ctypes) built from the host's own Debian source
packages with musl-gcc (Debian's musl-tools), installed beside busybox-static's applets
into an otherwise empty root.  Its layout is an Alpine system's: ``/lib/ld-musl-<arch>.so.1``
is the C library and its loader, ``/bin`` is busybox, and nothing in it comes from glibc.

Built once per machine (a few minutes on 2 cores) and kept in pytest's cache directory,
keyed by the versions it is made of and by RECIPE.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_isolate.images.debs import OS_RELEASE, parse_os_release, private_apt, sources_for

#: bumped when the build below changes, so a machine's earlier build is not reused
RECIPE = 2
MUSL_GCC = "/usr/bin/musl-gcc"
BUSYBOX = "/bin/busybox"
#: what the build needs from the host: setup.sh installs them
NEEDS = {MUSL_GCC: "musl-tools", BUSYBOX: "busybox-static", "/usr/bin/make": "make",
         "/usr/bin/apt-get": "apt", "/usr/sbin/chroot": "coreutils"}
#: the interpreter built: the host's own minor version (what the host pytest runs on)
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"
#: what the agent and pytest import that a build can leave out (checked after it)
NEEDED_MODULES = ("ctypes", "binascii", "zipfile", "json", "socket", "select", "subprocess",
                  "fcntl", "unicodedata", "math", "struct")
#: what a test image does not need (pruned after the install: ~3/4 of its size)
PRUNE = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
         "unittest/test")


def package_version(package: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                          text=True, check=True).stdout


def host_codename() -> str:
    for path in OS_RELEASE:
        if os.path.exists(path):
            codename = parse_os_release(Path(path).read_text()).get("VERSION_CODENAME")
            if codename:
                return codename
    pytest.fail("the host's os-release names no Debian release to fetch python's source of")


def musl_root(cache: Path, log: Path) -> Path:
    """The root filesystem (built now unless cache holds it); the build's output in log."""
    for tool, package in NEEDS.items():
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs {package}")
    versions = f"{PYTHON} {package_version('musl-tools')} {package_version('busybox-static')}"
    key = hashlib.sha256(f"{RECIPE} {host_codename()} {platform.machine()} {versions}".encode())
    done = cache / key.hexdigest()[:16]
    if (done / "root").is_dir():
        return done / "root"
    work = cache / f"{done.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with open(log, "ab") as out:
        def run(argv: list[str], cwd: Path, **env: str) -> None:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env}, stdin=subprocess.DEVNULL)
            if proc.returncode:
                pytest.fail(f"building the musl image: {argv[0]} failed ({proc.returncode}); "
                            f"its output ends:\n{log.read_text()[-3000:]}")

        python_src, ffi_src = fetch_sources(work, run, {PYTHON: "Python-*", "libffi": "libffi-*"})
        cc = str(musl_compiler(work))
        jobs = f"-j{os.cpu_count() or 1}"
        # libffi (what ctypes needs, and the agent uses ctypes) as a static library that
        # _ctypes links in, so the image needs no libffi of its own
        ffi = work / "ffi"
        run(["./configure", f"--prefix={ffi}", "--disable-shared", "--enable-static",
             "--disable-docs", "--disable-multi-os-directory"], ffi_src, CC=cc,
            CFLAGS="-O1 -fPIC")
        run(["make", jobs, "install"], ffi_src)
        # no pkg-config: it answers for the host's (glibc) libraries, whose headers and
        # libraries musl-gcc cannot use; such modules (zlib, ssl, ...) are left out
        run(["./configure", "--prefix=/usr", "--without-ensurepip", "--disable-test-modules"],
            python_src, CC=cc, OPT="-O1", PKG_CONFIG_LIBDIR=str(work / "no-pkg-config"),
            CPPFLAGS=f"-I{ffi}/include", LDFLAGS=f"-L{ffi}/lib")
        run(["make", jobs], python_src)
        root = work / "root"
        run(["make", "install", f"DESTDIR={root}"], python_src)
    prune(root)
    add_system(root)
    check = subprocess.run(["chroot", str(root), f"/usr/bin/{PYTHON}", "-c",
                            "import " + ", ".join(NEEDED_MODULES)],
                           capture_output=True, text=True)
    if check.returncode:
        pytest.fail(f"the musl build of {PYTHON} does not run, or lacks a module the agent or "
                    f"pytest needs:\n{check.stderr}(the build's output: {log})")
    os.replace(work, done)
    return done / "root"


def fetch_sources(work: Path, run: Callable[..., None], packages: dict[str, str]) -> list[Path]:
    """The upstream source trees of packages (source package -> the glob of the directory
    its tarball unpacks into), from the deb-src of the host's own sources (through the
    host's apt configuration: proxy, CA), unpacked in work."""
    # the release's own suite only: its upstream tarball is the one every pocket uses, and
    # a security archive may lack a version's other source files
    codename = host_codename()
    lines = [line.replace("deb ", "deb-src ", 1) for line in sources_for(codename, None)
             if line.split()[-2] == codename]
    options = private_apt(work / "apt", lines)
    run(["apt-get", "-q", *options, "update"], work)
    run(["apt-get", "-q", *options, "source", "--download-only", *packages], work)
    trees = []
    for package, unpacks_into in packages.items():
        tarballs = sorted(work.glob(f"{package}_*.orig.tar.*"))
        if not tarballs:
            pytest.fail(f"apt-get source {package} fetched no upstream tarball into {work}")
        run(["tar", "xf", tarballs[0].name], work)
        found = [p for p in work.glob(unpacks_into) if p.is_dir()]
        if len(found) != 1:
            pytest.fail(f"{tarballs[0]} unpacked into {found} (one {unpacks_into} expected)")
        trees.append(found[0])
    return trees


def musl_compiler(work: Path) -> Path:
    """musl-gcc, with the kernel's headers (musl's own include directory has none) and a
    multiarch of musl: CPython's configure and setup.py ask the compiler for it, and gcc's
    answer (…-linux-gnu) would add glibc's headers to the build."""
    triplet = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True,
                             check=True).stdout.strip()
    headers = work / "kernel-headers"
    headers.mkdir()
    for name, target in (("linux", "/usr/include/linux"),
                         ("asm-generic", "/usr/include/asm-generic"),
                         ("asm", f"/usr/include/{triplet}/asm")):
        (headers / name).symlink_to(target)
    musl = triplet.replace("-gnu", "-musl")
    cc = work / "musl-cc"
    cc.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --print-multiarch|-print-multiarch) '
        f"echo {musl}; exit 0;; esac; done\n"
        f'exec {MUSL_GCC} -isystem {headers} "$@"\n')
    cc.chmod(0o755)
    return cc


def prune(root: Path) -> None:
    lib = root / "usr/lib" / PYTHON
    for name in PRUNE:
        shutil.rmtree(lib / name, ignore_errors=True)
    for static in (lib.glob("config-*/*.a")):
        static.unlink()
    shutil.rmtree(root / "usr/share", ignore_errors=True)
    shutil.rmtree(root / "usr/include", ignore_errors=True)


def add_system(root: Path) -> None:
    """musl's libc as /lib/ld-musl-ARCH.so.1 (also libc.musl-ARCH.so.1, as on Alpine),
    busybox with a link per applet (/bin/sh, /usr/bin/env, ...), and the directories a
    root has."""
    machine = platform.machine()
    loader = f"/lib/ld-musl-{machine}.so.1"  # musl's package: a link to its libc.so
    if not os.path.exists(loader):
        pytest.fail(f"{loader} is missing: musl-tools (scripts/setup.sh) installs musl")
    (root / "lib").mkdir(exist_ok=True)
    shutil.copy(os.path.realpath(loader), root / loader.lstrip("/"))
    (root / f"lib/libc.musl-{machine}.so.1").symlink_to(f"ld-musl-{machine}.so.1")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if link.parent != root and not (link.exists() or link.is_symlink()):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for d in ("dev", "proc", "sys", "root", "etc", "run", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
