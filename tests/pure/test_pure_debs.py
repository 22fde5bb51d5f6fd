"""`packages` on an image (images/debs.py), the parts that need no apt and no engine:
which release an image is of, the sources its packages come from, and the order the
image's dpkg installs them in."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_isolate.errors import ProvisionError
from pytest_isolate.images import debs

TRIXIE = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_CODENAME=trixie\n'
UBUNTU = 'PRETTY_NAME="Ubuntu 24.04 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n'
ALPINE = 'NAME="Alpine Linux"\nID=alpine\nPRETTY_NAME="Alpine Linux v3.20"\n'
SID = 'PRETTY_NAME="Debian GNU/Linux trixie/sid"\nID=debian\n'


def test_the_release_is_the_images_codename() -> None:
    assert debs.debian_codename(TRIXIE, True, "image 'x'", ["hello"], None) == "trixie"
    assert debs.debian_codename(SID, True, "image 'x'", ["hello"], None) == "trixie"
    # another dpkg-based distribution: its own archive, named by mirror
    assert debs.debian_codename(UBUNTU, True, "image 'u'", ["hello"], "http://m/ubuntu") == "noble"


@pytest.mark.parametrize(("os_release", "dpkg", "mirror", "expected"), [
    (ALPINE, False, None, "image 'x' is not Debian-based (Alpine Linux v3.20, no dpkg), so its "
     "packages (hello, file) cannot be installed by pytest-isolate; install them in the image "
     "itself (a Dockerfile and `dockerfile =`), or remove `packages`"),
    (None, False, None, "image 'x' is not Debian-based (no /etc/os-release, no dpkg)"),
    (TRIXIE, False, None, "image 'x' is not Debian-based (Debian GNU/Linux 13 (trixie), no dpkg)"),
    (UBUNTU, True, None, "image 'x' is Ubuntu 24.04 LTS, which is not Debian: its packages "
     "(hello, file) come from its own archive; set `mirror` to that archive's URI (for noble)"),
])
def test_what_cannot_be_installed_is_one_error(os_release: str | None, dpkg: bool,
                                               mirror: str | None, expected: str) -> None:
    with pytest.raises(ProvisionError) as info:
        debs.debian_codename(os_release, dpkg, "image 'x'", ["hello", "file"], mirror)
    assert expected in str(info.value)


def test_sources_follow_the_hosts_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = tmp_path / "sources.list"
    listing.write_text("# a comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a/debian bookworm main\n"
                       "deb http://a/debian bookworm-updates main contrib\n"
                       "deb-src http://a/debian bookworm main\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://s/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://other/thing\nSuites: stable-backports\nEnabled: no\n")
    (parts / "ignored.list.disabled").write_text("deb http://x/ bookworm main\n")
    monkeypatch.setattr(debs, "SOURCES_DIRS", (listing, parts))
    assert debs.sources_for("trixie", None) == [
        "deb [signed-by=/k.gpg] http://a/debian trixie main",
        "deb http://a/debian trixie-updates main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://s/debian-security "
        "trixie-security main"]
    # sid has no -updates or -security; a mirror replaces the host's sources
    assert debs.sources_for("sid", None) == ["deb [signed-by=/k.gpg] http://a/debian sid main"]
    assert debs.sources_for("trixie", "http://m/debian") == ["deb http://m/debian trixie main"]
    monkeypatch.setattr(debs, "SOURCES_DIRS", (tmp_path / "none",))
    with pytest.raises(ProvisionError, match="name no Debian archive"):
        debs.sources_for("trixie", None)


PLAN = """\
NOTE: This is only a simulation!
Inst python3.13-minimal (3.13.5-2 Debian:13 [amd64])
Conf python3.13-minimal (3.13.5-2 Debian:13 [amd64])
Inst python3-minimal (3.13.5-1 Debian:13 [amd64])
Conf python3-minimal (3.13.5-1 Debian:13 [amd64])
Inst libmagic1t64:amd64 (1:5.46-5 Debian:13 [amd64])
Inst hello (2.10-5 Debian:13 [amd64])
Conf libmagic1t64:amd64 (1:5.46-5 Debian:13 [amd64])
Conf hello (2.10-5 Debian:13 [amd64])
"""


def test_the_install_script_follows_apts_plan() -> None:
    """Pre-Depends: python3-minimal is unpacked only after python3.13-minimal is configured
    (dpkg alone, given every file at once, would refuse it)."""
    files = [Path(f"/d/{name}") for name in (
        "hello_2.10-5_amd64.deb", "libmagic1t64_1%3a5.46-5_amd64.deb",
        "python3-minimal_3.13.5-1_amd64.deb", "python3.13-minimal_3.13.5-2_amd64.deb")]
    script = debs.install_script(PLAN, files).splitlines()
    steps = [line.replace(debs.DPKG + " ", "") for line in script[2:]]
    assert steps == [
        f"--unpack {debs.DEBS_DIR}/python3.13-minimal_3.13.5-2_amd64.deb",
        "--configure python3.13-minimal",
        f"--unpack {debs.DEBS_DIR}/python3-minimal_3.13.5-1_amd64.deb",
        "--configure python3-minimal",
        f"--unpack {debs.DEBS_DIR}/libmagic1t64_1%3a5.46-5_amd64.deb",
        f"--unpack {debs.DEBS_DIR}/hello_2.10-5_amd64.deb",
        "--configure libmagic1t64", "--configure hello", "--configure -a"]
    assert script[0] == "set -e"
    with pytest.raises(ProvisionError, match="apt planned to install hello, but fetched no"):
        debs.install_script(PLAN, files[1:])
