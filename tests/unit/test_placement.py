"""Placement over the host pool: slots weighting, dead hosts skipped, moves reported.

The pure tests call config.place; the runs use the fake backend, whose pool endpoints
are files standing for engines (an engine answers while its file exists).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from unit_support import Project

from pytest_isolate import config as cfg
from pytest_isolate.errors import ConfigError, NoHostLeft
from pytest_isolate.spec import EnvSpec
from pytest_isolate.timing import Move, RunReport

DOCKER = EnvSpec("docker", "docker", arch="amd64")
ARM = EnvSpec("arm", "docker", arch="arm64")
WHERE = "/p/pyproject.toml: [tool.pytest-isolate.hosts.a]"


def host(name: str, slots: int = 1, arches: tuple[str, ...] = (), **endpoints: str) -> cfg.PoolHost:
    return cfg.PoolHost(name, endpoints or {"docker": f"unix:///{name}.sock"}, arches, slots)


def placed(spec: EnvSpec, hosts: list[cfg.PoolHost], workers: int,
           dead: dict[tuple[str, str], str] | None = None) -> list[str]:
    names = []
    for k in range(workers):
        chosen = cfg.place(spec, hosts, f"gw{k}", dead)
        assert chosen is not None
        names.append(chosen.name)
    return names


def test_slots_weight_the_workers() -> None:
    hosts = [host("big", slots=3), host("small")]
    assert placed(DOCKER, hosts, 8) == ["big", "big", "big", "small"] * 2
    assert Counter(placed(DOCKER, hosts, 400)) == {"big": 300, "small": 100}


def test_default_is_round_robin() -> None:
    assert placed(DOCKER, [host("a"), host("b")], 4) == ["a", "b", "a", "b"]
    not_xdist = cfg.place(DOCKER, [host("a"), host("b")], "")
    assert not_xdist is not None and not_xdist.name == "a"


def test_dead_host_is_skipped_and_live_hosts_keep_their_workers() -> None:
    hosts = [host("a"), host("b"), host("c")]
    dead = {("b", "docker"): "the engine does not answer"}
    # b's worker takes the next slot's host; a's and c's workers stay where they were
    assert placed(DOCKER, hosts, 3, dead) == ["a", "c", "c"]
    # dead for another backend only: still serves docker
    assert placed(DOCKER, hosts, 3, {("b", "qemu"): "down"}) == ["a", "b", "c"]


def test_arch_and_backend_filter_the_candidates() -> None:
    hosts = [host("x86", arches=("amd64",)), host("arm", arches=("arm64",)),
             host("vm", qemu="qemu:///system"), host("any")]
    assert placed(ARM, hosts, 4) == ["arm", "any", "arm", "any"]
    assert placed(DOCKER, hosts, 2) == ["x86", "any"]
    assert cfg.place(EnvSpec("lxc", "lxc"), hosts, "gw0") is None  # the default engine


def test_no_candidate_left_names_every_host_and_reason() -> None:
    hosts = [host("a"), host("b", slots=2), host("arm", arches=("arm64",))]
    dead = {("a", "docker"): "refused at unix:///a.sock", ("b", "docker"): "timed out"}
    with pytest.raises(NoHostLeft) as info:
        cfg.place(DOCKER, hosts, "gw1", dead)
    assert info.value.dead == {"a": "refused at unix:///a.sock", "b": "timed out"}
    message = str(info.value)
    assert ("no host of the pool is left for environment 'docker' (docker, amd64): "
            "host 'a': refused at unix:///a.sock; host 'b': timed out") in message
    assert "'arm'" not in message  # not a candidate: arm64 only


def test_slots_parsed_and_defaulted() -> None:
    table = {"hosts": {"a": {"docker": "unix:///a.sock", "slots": 4},
                       "b": {"docker": "unix:///b.sock"}}}
    a, b = cfg.resolve_hosts(table, Path("/p/pyproject.toml"), ["docker"])
    assert (a.slots, b.slots) == (4, 1)


@pytest.mark.parametrize("value", [0, -2, 1.5, "4", True])
def test_bad_slots_name_key_value_file_and_fix(value: object) -> None:
    table = {"hosts": {"a": {"docker": "unix:///a.sock", "slots": value}}}
    with pytest.raises(ConfigError) as info:
        cfg.resolve_hosts(table, Path("/p/pyproject.toml"), ["docker"])
    assert str(info.value) == (
        f"{WHERE}: key 'slots' must be a positive integer, got {value!r}; write how many "
        "environments the host runs at once, e.g. slots = 4 (or leave the key out for 1)")


def test_misspelt_slots_suggested() -> None:
    table = {"hosts": {"a": {"docker": "unix:///a.sock", "slot": 2}}}
    with pytest.raises(ConfigError, match=r"unknown key 'slot' \(did you mean 'slots'\?\)"):
        cfg.resolve_hosts(table, Path("/p/pyproject.toml"), ["docker"])


def test_workers_moves_merged_into_the_controllers_report() -> None:
    controller, worker = RunReport("run"), RunReport("run-gw1")
    worker.moves.append(Move("docker", "a", "b", "the engine does not answer"))
    controller.merge(json.loads(json.dumps(worker.to_json())))
    assert controller.to_json()["moves"] == [{"env": "docker", "from_host": "a",
                                             "to_host": "b",
                                             "reason": "the engine does not answer"}]


# ---------------------------------------------------------------- runs over the fake pool
def pool(project: Project, *names: str) -> dict[str, Path]:
    """A pool of fake hosts named names, in that order; each engine's file is created
    by the caller (an absent file is a dead engine)."""
    engines = {n: project.path / f"{n}.engine" for n in names}
    project.pyproject("".join(f'\n[tool.pytest-isolate.hosts.{n}]\nfake = "{p}"\n'
                              for n, p in engines.items()))
    return engines


def test_dead_host_at_start_moves_the_environment(project: Project) -> None:
    engines = pool(project, "dead", "live")
    engines["live"].touch()
    project.tests(f"""
        import os, pytest

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.parametrize("n", range(3))
        def test_on_live(n):
            assert os.environ["FAKE_ENDPOINT"] == {str(engines["live"])!r}
    """)
    result = project.run("--isolate-strict", "--isolate-report", "report.json")
    result.assert_outcomes(passed=3)
    report = json.loads((project.path / "report.json").read_text())
    assert report["moves"] == [{
        "env": "fakeenv", "from_host": "dead", "to_host": "live",
        "reason": f"the fake engine does not answer at {engines['dead']}"}]
    assert report["environments"]["fakeenv"]["host"] == "live"
    assert report["environments"]["fakeenv"]["starts"] == 1


@pytest.mark.parametrize("host_dies", [True, False], ids=["host-dies", "host-lives"])
def test_lost_agent_moves_only_off_a_dead_host(project: Project, host_dies: bool) -> None:
    engines = pool(project, "first", "second")
    for path in engines.values():
        path.touch()
    after = "second" if host_dies else "first"
    project.relay_setup()
    project.tests(f"""
        import os, signal, time, pytest

        @pytest.mark.isolate("fakeenv")
        def test_environment_lost(setup_relayed):
            assert os.environ["FAKE_ENDPOINT"] == {str(engines["first"])!r}
            setup_relayed()  # the host has the setup report: the agent dies in the call
            if {host_dies}:
                os.unlink(os.environ["FAKE_ENDPOINT"])  # the engine is gone...
            # ...and the environment: the worker's parent is the zygote, whose parent
            # is the agent
            with open("/proc/%d/stat" % os.getppid()) as f:
                agent = int(f.read().rsplit(")", 1)[1].split()[1])
            os.kill(agent, signal.SIGKILL)
            time.sleep(10)

        @pytest.mark.isolate("fakeenv")
        def test_next():
            assert os.environ["FAKE_ENDPOINT"] == {str(engines[after])!r}
    """)
    result = project.run("-v", "--isolate-strict", "--isolate-report", "report.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*::test_environment_lost FAILED*", "*::test_next PASSED*"])
    result.stdout.fnmatch_lines(["environment 'fakeenv': the agent's stream ended*"])
    report = json.loads((project.path / "report.json").read_text())
    assert report["environments"]["fakeenv"]["starts"] == 2
    assert report["moves"] == ([{
        "env": "fakeenv", "from_host": "first", "to_host": "second",
        "reason": f"the fake engine does not answer at {engines['first']}"}]
        if host_dies else [])


def test_no_host_left_fails_with_every_host(project: Project) -> None:
    engines = pool(project, "one", "two")
    project.tests("""
        import pytest

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.parametrize("n", range(2))
        def test_nowhere(n):
            pass
    """)
    result = project.run("--isolate-strict")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*backend 'fake' is unavailable: no host of the pool is left for environment "
        f"'fakeenv' (fake, *): host 'one': the fake engine does not answer at {engines['one']}; "
        f"host 'two': the fake engine does not answer at {engines['two']}; start those "
        "engines*"])
