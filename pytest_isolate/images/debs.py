"""`packages` on a Debian-based image: resolved and downloaded by the host's apt, installed
by the image's own dpkg with no network.

The host's apt does the fetching because it is the one that reaches the machine's
package sources: it reads the host's configuration (proxy, CA, authentication), and
the environment never needs a network.  It resolves the packages against the image's
own dpkg status (so only what the image lacks is fetched), from the image's release
(VERSION_CODENAME in its /etc/os-release) at the URIs of the host's Debian sources, or
at the environment's `mirror`.  The image's dpkg then installs them inside: a chroot of
the exported root filesystem (image_rootfs.py), or a container of the image (docker).

An image that is not Debian-based (no dpkg, or an os-release that names no Debian
release) is one clear error: Alpine's apk would need Alpine's mirrors, which the host's
configuration does not name.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_isolate.errors import ProvisionError
from pytest_isolate.spec import EnvSpec

#: Where the downloaded packages are bound (chroot) or copied (a container) inside.
DEBS_DIR = "/.isolate/debs"
DPKG = "dpkg --force-confdef --force-confold"
#: Where an image says what it is (the first that is a regular file), and what dpkg has.
OS_RELEASE = ("/usr/lib/os-release", "/etc/os-release")
DPKG_STATUS = "/var/lib/dpkg/status"
SOURCES_DIRS = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
#: Releases with no -updates or -security suites.
ROLLING = ("sid", "unstable", "experimental")


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5) assignments, quotes removed."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            out[key] = value.strip().strip("\"'")
    return out


def debian_codename(os_release: str | None, has_dpkg: bool, what: str, packages: Iterable[str],
                    mirror: str | None) -> str:
    """The Debian release an image is of (its VERSION_CODENAME); ProvisionError naming the
    image and the fix when it is not Debian-based.  Another dpkg-based distribution (its
    ID_LIKE says debian) needs the environment's `mirror` for its own archive."""
    fields = parse_os_release(os_release or "")
    codename = fields.get("VERSION_CODENAME", "")
    if not codename and "PRETTY_NAME" in fields:  # sid and testing images say it here
        found = re.search(r"\b(sid|trixie|forky|duke|bookworm|bullseye)\b", fields["PRETTY_NAME"])
        codename = found.group(1) if found else ""
    ident = fields.get("ID", "")
    like = fields.get("ID_LIKE", "").split()
    name = fields.get("PRETTY_NAME") or ident or "no /etc/os-release"
    wanted = ", ".join(packages)
    if not has_dpkg or not codename or (ident != "debian" and "debian" not in like):
        raise ProvisionError(
            f"{what} is not Debian-based ({name}{'' if has_dpkg else ', no dpkg'}), so its "
            f"packages ({wanted}) cannot be installed by pytest-isolate; install them in the "
            "image itself (a Dockerfile and `dockerfile =`), or remove `packages`")
    if ident != "debian" and mirror is None:
        raise ProvisionError(
            f"{what} is {name}, which is not Debian: its packages ({wanted}) come from its own "
            f"archive; set `mirror` to that archive's URI (for {codename}), or install them in "
            "the image itself")
    return codename


def host_sources() -> list[tuple[str, str, str | None]]:
    """(URI, suite, signed-by) of the host's Debian sources (one-line and deb822 files)."""
    found: list[tuple[str, str, str | None]] = []
    files: list[Path] = []
    for where in SOURCES_DIRS:
        if where.is_file():
            files.append(where)
        elif where.is_dir():
            files += sorted(p for p in where.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = deb822(stanza)
                if "deb" not in fields.get("types", "").split() or \
                        fields.get("enabled", "yes") == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    found += [(uri, suite, fields.get("signed-by"))
                              for suite in fields.get("suites", "").split()]
            continue
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                signed = re.search(r"signed-by=(\S+)", m.group(1) or "")
                found.append((m.group(2), m.group(3), signed.group(1) if signed else None))
    return found


def deb822(stanza: str) -> dict[str, str]:
    """A deb822 stanza's fields (lower-case names; comment lines dropped)."""
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#"):
            continue
        if line[:1].isspace() and key:
            fields[key] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            fields[key] = value.strip()
    return fields


def sources_for(codename: str, mirror: str | None) -> list[str]:
    """One-line sources of codename: at mirror, else at the host's Debian URIs (the main
    archive's for codename and -updates, the security archive's for -security)."""
    if mirror is not None:
        return [f"deb {mirror} {codename} main"]
    lines: list[str] = []
    for uri, suite, signed in host_sources():
        base, _, pocket = suite.partition("-")
        if not re.fullmatch(r"[a-z]+", base) or base == "experimental":
            continue
        if pocket and (codename in ROLLING or pocket not in ("updates", "security")):
            continue
        option = f"[signed-by={signed}] " if signed and signed.startswith("/") else ""
        line = f"deb {option}{uri} {codename}{'-' + pocket if pocket else ''} main"
        if line not in lines:
            lines.append(line)
    if not lines:
        raise ProvisionError(
            "the host's apt sources name no Debian archive to fetch an image's packages "
            f"from (read {', '.join(map(str, SOURCES_DIRS))}); set the environment's "
            "`mirror` to a Debian archive's URI")
    return lines


def private_apt(work: Path, sources: list[str], status: bytes = b"") -> list[str]:
    """apt-get's options for an apt of its own in work: its lists, cache and dpkg status
    (status: an image's; empty: nothing installed), the one-line sources given, no
    preferences, no lock.  The host's apt configuration (proxy, CA) still applies."""
    for d in ("state/lists/partial", "cache/archives/partial", "parts"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "status").write_bytes(status)
    (work / "sources.list").write_text("\n".join(sources) + "\n")
    return [
        "-o", f"Dir::State={work / 'state'}", "-o", f"Dir::State::status={work / 'status'}",
        "-o", f"Dir::Cache={work / 'cache'}",
        "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={work / 'parts'}",
        "-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=true",
        "-o", "Dir::Etc::Preferences=/dev/null", "-o", "Dir::Etc::PreferencesParts=/dev/null",
    ]


def install_script(plan: str, debs: list[Path]) -> str:
    """The shell script that installs debs (bound or copied at DEBS_DIR) in the order of
    plan, the output of `apt-get -s install` (Inst: unpack, Conf: configure): what apt
    would run, which honours Pre-Depends, with no apt needed inside."""
    files = {deb.name.split("_", 1)[0]: deb.name for deb in debs}
    lines = ["set -e", "export DEBIAN_FRONTEND=noninteractive"]
    for line in plan.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] not in ("Inst", "Conf"):
            continue
        name = words[1].split(":", 1)[0]
        if words[0] == "Inst":
            if name not in files:
                raise ProvisionError(f"apt planned to install {name}, but fetched no "
                                     f"{name}_*.deb (fetched: {', '.join(sorted(files))})")
            lines.append(f"{DPKG} --unpack {DEBS_DIR}/{files[name]}")
        else:
            lines.append(f"{DPKG} --configure {name}")
    lines.append(f"{DPKG} --configure -a")
    return "\n".join(lines) + "\n"


def download(spec: EnvSpec, codename: str, status: bytes, dest: Path, work: Path,
             log: Path, progress: Any, what: str) -> tuple[list[Path], str]:
    """The .deb files of spec.packages and what they need that the image (whose dpkg
    status is `status`) lacks, downloaded into dest by the host's apt-get, and the script
    that installs them (install_script)."""
    from pytest_isolate.images.rootfs import run_logged

    apt = shutil.which("apt-get")
    if apt is None:
        raise ProvisionError(f"{what}: installing packages on an image needs the host's "
                             "apt-get (a Debian or Ubuntu host); install the packages in the "
                             "image itself instead")
    options = [*private_apt(work, sources_for(codename, spec.mirror), status),
               "-o", f"APT::Architecture={spec.arch}", "-o", f"APT::Architectures={spec.arch}"]
    label = f"fetching the packages of {spec.name!r} for {what} ({codename})"
    progress(f"{label}: {', '.join(spec.packages)}")
    run_logged([apt, "-q", *options, "update"], log, progress, f"{label}: apt-get update")
    install = [apt, "-q", "-y", "--no-install-recommends", *options, "install",
               *spec.packages]
    run_logged([*install[:3], "--download-only", *install[3:]], log, progress,
               f"{label}: apt-get install")
    plan = work / "plan.txt"
    run_logged(["sh", "-c", 'exec "$@" >"$0"', str(plan), *install[:3], "-s", *install[3:]],
               log, progress, f"{label}: apt-get install's plan")
    debs = sorted((work / "cache/archives").glob("*.deb"))
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.move(str(deb), dest / deb.name)
    found = [dest / deb.name for deb in debs]
    return found, install_script(plan.read_text(), found)


def install_in_root(spec: EnvSpec, root: Path, what: str, log: Path, progress: Any) -> None:
    """spec.packages installed into the unpacked root filesystem of a Debian-based image:
    fetched on the host, then its dpkg in a chroot of it (no network); ProvisionError
    with the log's tail when a step fails."""
    from pytest_isolate.images.envvars import environment_variables
    from pytest_isolate.images.rootfs import run_in_root

    # not through a symlink: an absolute one would name the host's file
    os_release = next((p.read_text(errors="replace") for p in
                       (root / path.lstrip("/") for path in OS_RELEASE)
                       if p.is_file() and not p.is_symlink()), None)
    status = root / DPKG_STATUS.lstrip("/")
    codename = debian_codename(os_release, status.is_file(), what, spec.packages, spec.mirror)
    work = root.parent / "debs-work"
    debs = root.parent / "debs"
    try:
        found, script = download(spec, codename, status.read_bytes(), debs, work, log,
                                 progress, what)
        if not found:
            progress(f"{what} has every package of {spec.name!r} already")
            return
        progress(f"installing {len(found)} packages into {what}")
        run_in_root(root, work / "launch", ["/bin/sh", "-c", script],
                    [[str(debs), DEBS_DIR, False]], False,
                    environment_variables(spec, system=True), "/", log, progress,
                    f"installing the packages of {spec.name!r} into {what}")
    finally:
        for d in (work, debs):
            shutil.rmtree(d, ignore_errors=True)
        for made in (DEBS_DIR, "/.isolate/ws", "/.isolate"):  # the launcher's mount points
            with contextlib.suppress(OSError):
                (root / made.lstrip("/")).rmdir()

