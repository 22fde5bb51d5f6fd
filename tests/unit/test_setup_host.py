"""``pytest-isolate setup``: plans are pure functions of a request and a host state.

The plans are checked against hand-made host states (a fresh machine, a machine where
everything is in place, one without systemd or apt...); the command line is run in
--dry-run mode, which reads the real machine and changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_isolate import config
from pytest_isolate.backends import BUILTIN_BACKENDS
from pytest_isolate.setup_host import (
    DOCKERD,
    HOST_NEEDS,
    HostState,
    Request,
    SetupError,
    Step,
    UserIds,
    free_subid_range,
    plan,
    select,
)

FRESH = HostState(installed=frozenset({"python3", "coreutils"}), binfmt_mounted=False)


def everything_in(request: Request, state: HostState) -> HostState:
    """The state after a plan for request ran: every package, binfmt, engine, id range."""
    p = plan(request, state)
    names = {"aarch64", "arm", "riscv64", "s390x", "ppc64le"}
    users = {u: UserIds(True, True, True) for u in state.users}
    return dataclasses.replace(state, installed=state.installed | set(p.packages),
                               binfmt_mounted=True, binfmt_enabled=frozenset(names),
                               docker_answers=True, podman_answers=True, libvirt_answers=True,
                               users=users)


def argvs(steps: list[Step]) -> list[tuple[str, ...]]:
    return [s.argv for s in steps]


def install_step(steps: list[Step]) -> tuple[str, ...]:
    (step,) = [s for s in steps if s.argv[:2] == ("apt-get", "install")]
    return step.argv


def test_fresh_machine_chroot_and_docker_installs_then_starts_the_engine() -> None:
    p = plan(Request(backends=("chroot", "docker")), FRESH)
    assert not p.problems
    assert p.steps[0].argv == ("apt-get", "update", "-q")
    assert ("DEBIAN_FRONTEND", "noninteractive") in p.steps[1].env
    packages = set(install_step(p.steps)[5:])
    assert packages == {"mmdebstrap", "util-linux", "docker.io"}
    assert "--no-install-recommends" in install_step(p.steps)
    dockerd = p.steps[-1]
    assert dockerd.argv == DOCKERD and dockerd.background_log
    assert dockerd.wait == ("docker", "info") and dockerd.wait_seconds >= 30
    # no binfmt, libvirt or user steps: nothing asked for them
    assert not any(s.argv[0] in ("update-binfmts", "mount", "libvirtd", "usermod")
                   for s in p.steps)
    # every step says why it is there
    assert all(s.reason for s in p.steps)
    assert "docker.io (docker: the Docker engine)" in p.steps[1].reason


def test_a_second_run_has_nothing_to_do() -> None:
    for request in (Request(backends=("chroot", "docker")),
                    Request(backends=tuple(HOST_NEEDS), arches=("arm64", "armhf"),
                            user="ci"),
                    Request(backends=("qemu",), arches=("amd64", "arm64"))):
        state = dataclasses.replace(FRESH, users={"ci": UserIds(True)})
        first = plan(request, state)
        assert not first.empty
        done = plan(request, everything_in(request, state))
        assert done.empty and not done.problems, done.steps


def test_only_missing_packages_are_installed_and_alternatives_count() -> None:
    state = dataclasses.replace(FRESH, installed=frozenset({"mmdebstrap", "util-linux",
                                                            "moby-engine"}), docker_answers=True)
    assert plan(Request(backends=("chroot", "docker")), state).empty
    state = dataclasses.replace(state, installed=frozenset({"mmdebstrap"}))
    assert install_step(plan(Request(backends=("docker", "chroot")), state).steps)[5:] == (
        "docker.io", "util-linux")


def test_foreign_architectures_get_qemu_user_and_binfmt() -> None:
    p = plan(Request(backends=("chroot",), arches=("arm64", "armhf", "i386")), FRESH)
    packages = set(install_step(p.steps)[5:])
    assert {"qemu-user-static", "binfmt-support", "arch-test"} <= packages
    assert ("mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc") in argvs(p.steps)
    enables = [s for s in p.steps if s.argv[0] == "update-binfmts"]
    # i386 runs natively on amd64: no interpreter for it
    assert [s.argv[-1] for s in enables] == ["qemu-aarch64", "qemu-arm"]
    # re-checked right before running: installing binfmt-support may have enabled it
    assert enables[0].unless == ("grep", "-qx", "enabled", "/proc/sys/fs/binfmt_misc/qemu-aarch64")
    # the mount comes before the registrations, the packages before both
    order = [s.argv[0] for s in p.steps]
    assert order.index("apt-get") < order.index("mount") < order.index("update-binfmts")


def test_an_enabled_registration_is_left_alone_and_arm64_host_is_native() -> None:
    state = dataclasses.replace(FRESH, binfmt_mounted=True, binfmt_enabled=frozenset({"aarch64"}),
                                installed=frozenset({"mmdebstrap", "util-linux", "qemu-user-static",
                                                     "binfmt-support", "arch-test"}))
    assert plan(Request(backends=("chroot",), arches=("arm64",)), state).empty
    arm_host = dataclasses.replace(FRESH, host_arch="arm64")
    p = plan(Request(backends=("chroot",), arches=("arm64",)), arm_host)
    assert "qemu-user-static" not in install_step(p.steps)
    assert not any(s.argv[0] == "update-binfmts" for s in p.steps)


def test_qemu_packages_follow_the_vm_architectures_and_libvirtd_is_started() -> None:
    p = plan(Request(backends=("qemu",), arches=("amd64",)), FRESH)
    packages = set(install_step(p.steps)[5:])
    assert {"qemu-system-x86", "qemu-utils", "e2fsprogs", "busybox-static",
            "libvirt-daemon-system"} <= packages
    assert "qemu-system-arm" not in packages
    p = plan(Request(backends=("qemu",), arches=("amd64", "arm64")), FRESH)
    assert "qemu-system-arm" in install_step(p.steps)
    assert argvs(p.steps)[-2:] == [("virtlogd", "-d"), ("libvirtd", "-d")]
    assert p.steps[-1].wait[-1] == "version"


def test_libvirtd_gets_dev_kvm_masked_when_kvm_cannot_run_guests() -> None:
    state = dataclasses.replace(FRESH, dev_kvm=True, kvm_usable=False, systemd=True,
                                libvirtd_running=True, virtlogd_running=True)
    steps = plan(Request(backends=("qemu",), packages=False), state).steps
    assert steps[0].argv == ("pkill", "-x", "libvirtd")  # runs, but hangs: restart it
    assert steps[1].argv[:4] == ("unshare", "-m", "--propagation", "private")
    # a node libvirt's QEMU user cannot open, so libvirt keeps its cached capabilities
    assert "mknod -m 000 /run/pytest-isolate/no-kvm c 1 3" in steps[1].argv[-1]
    assert "mount --bind /run/pytest-isolate/no-kvm /dev/kvm" in steps[1].argv[-1]
    good = dataclasses.replace(state, kvm_usable=True, libvirtd_running=False)
    assert argvs(plan(Request(backends=("qemu",), packages=False), good).steps) == [
        ("systemctl", "start", "libvirtd")]


def test_systemd_hosts_start_docker_through_systemctl() -> None:
    state = dataclasses.replace(FRESH, systemd=True)
    steps = plan(Request(backends=("docker",), packages=False), state).steps
    assert argvs(steps) == [("systemctl", "start", "docker")]
    assert steps[0].background_log is None


def test_a_remote_docker_host_is_not_replaced_by_a_local_engine() -> None:
    state = dataclasses.replace(FRESH, docker_host="ssh://ci@arm-box")
    p = plan(Request(backends=("docker",), packages=False), state)
    assert p.empty
    assert any("DOCKER_HOST=ssh://ci@arm-box" in n for n in p.notes)


def test_rootless_user_gets_a_free_subordinate_range() -> None:
    state = dataclasses.replace(FRESH, installed=frozenset({"mmdebstrap", "util-linux", "uidmap"}),
                                users={"ci": UserIds(True)},
                                subid_ranges=((100000, 65536), (165536, 65536)))
    (step,) = plan(Request(backends=("chroot",), user="ci"), state).steps
    assert step.argv == ("usermod", "--add-subuids", "231072-296607",
                         "--add-subgids", "231072-296607", "ci")
    half = dataclasses.replace(state, users={"ci": UserIds(True, subuid=True)})
    (step,) = plan(Request(backends=("chroot",), user="ci"), half).steps
    assert step.argv[:2] == ("usermod", "--add-subgids")
    p = plan(Request(backends=("chroot",), user="ghost"), state)
    assert p.problems and "no such user" in p.problems[0] and "useradd" in p.problems[0]


def test_free_subid_range() -> None:
    assert free_subid_range([]) == 100000
    assert free_subid_range([(100000, 65536)]) == 165536
    assert free_subid_range([(300000, 10)]) == 100000          # fits below
    assert free_subid_range([(150000, 10), (100000, 65536)]) == 165536
    assert free_subid_range([(120000, 100000)], count=10, start=100000) == 100000


def test_no_apt_no_root_are_problems_not_commands() -> None:
    other = dataclasses.replace(FRESH, apt=False, os_name="Fedora Linux 41")
    p = plan(Request(backends=("docker",)), other)
    assert not any(s.argv[0] == "apt-get" for s in p.steps)
    assert "Fedora Linux 41" in p.problems[0] and "docker.io" in p.problems[0]
    nobody = dataclasses.replace(FRESH, root=False, sudo=False)
    p = plan(Request(backends=("chroot",)), nobody)
    assert any("needs root" in problem for problem in p.problems)
    with_sudo = dataclasses.replace(nobody, sudo=True)
    assert not plan(Request(backends=("chroot",)), with_sudo).problems
    # nothing to do needs no root
    done = everything_in(Request(backends=("chroot",)), nobody)
    assert not plan(Request(backends=("chroot",)), done).problems


def test_dry_run_lines_are_shell() -> None:
    step = plan(Request(backends=("docker",)), FRESH).steps[1]
    line = step.shell(["sudo"])
    assert line.startswith("sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y")
    dockerd = plan(Request(backends=("docker",)), FRESH).steps[-1]
    assert dockerd.shell().startswith("nohup dockerd --bridge=none")
    assert "2>&1 &" in dockerd.shell() and "docker info" in dockerd.shell()


# ---------------------------------------------------------------- selection


def specs_of(text: str, tmp_path: Path) -> tuple[dict[str, object], list[str]]:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    table = config.load_pyproject(path)
    specs = config.resolve_envs(table, path, BUILTIN_BACKENDS)
    return dict(specs), list(table.get("envs", {}))


PROJECT = """
[tool.pytest-isolate.envs.arm]
backend = "chroot"
arch = "arm64"
[tool.pytest-isolate.envs.img]
backend = "docker"
"""


def test_select_from_the_project_envs_and_options(tmp_path: Path) -> None:
    specs, user_envs = specs_of(PROJECT, tmp_path)
    r = select(specs, user_envs)
    assert r.backends == ("chroot", "docker") and r.arches == ("arm64",)
    assert "arm, img" in r.why
    r = select(specs, user_envs, envs=["img"])
    assert r.backends == ("docker",) and r.arches == ()
    r = select(specs, user_envs, backends=["chroot"], arches=["riscv64"], user="ci")
    assert r.backends == ("chroot",) and r.arches == ("riscv64", "arm64") and r.user == "ci"
    r = select(specs, user_envs, backends=["all"])
    assert set(r.backends) == set(HOST_NEEDS) and "arm64" in r.arches  # arm64_vm, arm
    r = select(specs, [])
    assert r.backends == ("chroot",) and "defines no environments" in r.why
    with pytest.raises(SetupError, match="unknown environment 'nope'"):
        select(specs, user_envs, envs=["nope"])
    with pytest.raises(SetupError, match="'kubernetes' is not one"):
        select(specs, user_envs, backends=["kubernetes"])


def test_cli_dry_run_changes_nothing_and_prints_commands_or_nothing(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PROJECT)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ISOLATE_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-m", "pytest_isolate", "setup", "--dry-run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 2), result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("setup for chroot, docker (the project's environments arm, img)")
    assert "foreign architectures: arm64" in lines[0]
    body = lines[1:]
    if "nothing to do: everything is in place" not in body:
        # a machine that lacks something: each command comes after its reason
        assert body and all(line.startswith(("# ", "note: ", "  (then wait")) or
                            not line.startswith(" ") for line in body)
        assert any(line.startswith("# ") for line in body)
    bad = subprocess.run([sys.executable, "-m", "pytest_isolate", "setup", "--envs", "nope"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("pytest-isolate: error: --envs: unknown environment 'nope'")


def test_podman_service_gives_containers_the_services_limits() -> None:
    """Without systemd the service is started by us, with a containers.conf that leaves
    container limits to the service (podman's fixed defaults fail where the hard limits
    are lower), its socket directory made first."""
    from pytest_isolate.setup_host import PODMAN_CONF, PODMAN_SOCKET

    steps = plan(Request(backends=("podman",), packages=False), FRESH).steps
    order = [s.argv[0] for s in steps]
    assert order == ["mkdir", "sh", "podman"], steps
    assert steps[0].argv[-1] == PODMAN_SOCKET.rsplit("/", 1)[0]
    assert "default_ulimits = []" in steps[1].argv[-1] and PODMAN_CONF in steps[1].argv[-1]
    service = steps[2]
    assert dict(service.env) == {"CONTAINERS_CONF": PODMAN_CONF}
    assert service.shell().startswith(f"nohup env CONTAINERS_CONF={PODMAN_CONF} podman ")
    assert service.wait[-1] == "info" and service.background_log
    answering = dataclasses.replace(FRESH, podman_answers=True)
    assert plan(Request(backends=("podman",), packages=False), answering).empty


def test_a_user_who_is_not_root_gets_a_rootless_podman_service_of_their_own() -> None:
    """Not root: podman is rootless, so setup starts the user's own service at the socket
    the backend will use ($XDG_RUNTIME_DIR/podman/podman.sock), without sudo; without a
    runtime directory of theirs (no login session) it says how to get one and how to start
    the service, and starts nothing."""
    url = "unix:///run/user/1001/podman/podman.sock"
    user = dataclasses.replace(FRESH, root=False, sudo=True, podman_url=url,
                               podman_from="the rootless default socket", user_name="alice")
    request = Request(backends=("podman",), packages=False)
    p = plan(request, user)
    assert [s.argv[0] for s in p.steps] == ["mkdir", "podman"], p.steps
    assert all(s.own for s in p.steps), p.steps
    assert p.steps[0].shell(["sudo"]) == "mkdir -p /run/user/1001/podman"
    service = p.steps[1]
    assert service.argv[-1] == url and "--cgroup-manager=cgroupfs" in service.argv
    assert dict(service.env) == {"XDG_RUNTIME_DIR": "/run/user/1001"}
    assert service.wait == ("podman", "--url", url, "info")
    assert not service.shell(["sudo"]).startswith("nohup sudo"), service.shell(["sudo"])
    assert any("rootless" in n and "without sudo" in n for n in p.notes), p.notes

    no_session = plan(request, dataclasses.replace(user, runtime_dir_ok=False))
    assert no_session.steps == [] and len(no_session.problems) == 1, no_session
    problem = no_session.problems[0]
    assert "install -d -m 0700 -o alice /run/user/1001" in problem, problem
    assert f"mkdir -p /run/user/1001/podman && podman --cgroup-manager=cgroupfs " \
           f"--events-backend=file system service --time=0 {url} &" in problem, problem

    with_systemd = plan(request, dataclasses.replace(user, systemd=True))
    assert argvs(with_systemd.steps) == [("systemctl", "--user", "start", "podman.socket")]
    assert with_systemd.steps[0].own
    assert plan(request, dataclasses.replace(user, podman_answers=True)).empty


def test_each_backend_declares_what_setup_installs_and_doctor_probes() -> None:
    """One home for a backend's host needs (issue 12): the class's host_needs is the table
    setup plans from, and doctor probes its commands, services and modules."""
    from pytest_isolate.cli.doctor import run_probe
    from pytest_isolate.config import load_backend_class

    assert set(HOST_NEEDS) == set(BUILTIN_BACKENDS)
    for name, ref in BUILTIN_BACKENDS.items():
        cls, why = load_backend_class(ref)
        assert cls is not None, why
        assert cls.host_needs is HOST_NEEDS[name]
        probe = run_probe(cls.host_needs)
        assert set(probe["tools"]) == {cmd for cmd, _ in cls.host_needs.commands}
        assert len(probe["daemons"]) == len(cls.host_needs.services)
    docker = HOST_NEEDS["docker"]
    assert ("dockerd", "docker.io") in docker.commands and docker.python
    qemu = HOST_NEEDS["qemu"]
    assert {p.name for p in qemu.packages_for(["arm64"])} >= {"qemu-system-arm", "qemu-utils"}
    assert "qemu-system-x86" not in {p.name for p in qemu.packages_for(["arm64"])}
