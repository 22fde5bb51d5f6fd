"""Outcome fidelity: what a test does inside the (fake) environment shows on the host as if local."""

from __future__ import annotations

import textwrap
import time

import pytest
from unit_support import Project

#: Every inner module starts with this: tests prove they ran in the agent, not on the host.
HEADER = """
import logging
import os
import sys

import pytest

def inside():
    # the agent's environment has it, the host pytest of these tests does not
    return os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") == "1"
"""


def src(body: str) -> str:
    return HEADER + textwrap.dedent(body)


def test_pass_and_fail_with_rewritten_assertion(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_ok():
            assert inside()

        @pytest.mark.isolate("fakeenv")
        def test_bad():
            assert inside()
            x = [1, 2, 3]
            assert x == [1, 2, 4]
    """))
    result = project.run("-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*def test_bad():*",
        ">*assert x == [[]1, 2, 4[]]",
        "E*assert [[]1, 2, 3[]] == [[]1, 2, 4[]]",
        "*At index 2 diff: 3 != 4*",
        "test_project.py:*: AssertionError",
    ])
    result.stdout.fnmatch_lines(["FAILED test_project.py::test_bad - assert [[]1, 2, 3[]] == [[]1, 2, 4[]]"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_failure_reads_exactly_like_a_local_failure(project: Project) -> None:
    body = """
            data = {"a": 1, "b": [1, 2]}
            print("side output")
            assert data == {"a": 1, "b": [1, 3]}
    """
    project.tests(src(f"""
        def test_here():
{body}
        @pytest.mark.isolate("fakeenv")
        def test_there():
{body}
    """))
    result = project.run("-v")
    result.assert_outcomes(failed=2)
    text = result.stdout.str()
    here = text.split("_ test_here _")[1].split("_ test_there _")[0]
    there = text.split("_ test_there _")[1].split("= pytest-isolate =")[0]
    strip = [ln for ln in here.splitlines() if ln.startswith(("E ", ">"))]
    assert strip, here
    assert strip == [ln for ln in there.splitlines() if ln.startswith(("E ", ">"))]
    assert "side output" in there


def test_errors_in_fixture_setup_and_teardown(project: Project) -> None:
    project.tests(src("""
        @pytest.fixture
        def broken_setup():
            raise RuntimeError("setup went wrong")

        @pytest.fixture
        def broken_teardown():
            yield 1
            raise RuntimeError("teardown went wrong")

        @pytest.mark.isolate("fakeenv")
        def test_setup_error(broken_setup):
            pass

        @pytest.mark.isolate("fakeenv")
        def test_teardown_error(broken_teardown):
            assert inside()

        @pytest.mark.isolate("fakeenv")
        def test_after():
            assert inside()
    """))
    result = project.run()
    # test_teardown_error passes its call and errors at teardown: pytest counts both
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_setup_error*",
        "*RuntimeError: setup went wrong",
        "*ERROR at teardown of test_teardown_error*",
        "*RuntimeError: teardown went wrong",
    ])
    result.stdout.fnmatch_lines([
        "ERROR test_project.py::test_setup_error - RuntimeError: setup went wrong",
        "ERROR test_project.py::test_teardown_error - RuntimeError: teardown went wrong",
    ])


def test_skip_xfail_xpass(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_skipped():
            assert inside()
            pytest.skip("not today")

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.skipif("True", reason="skipif inside")
        def test_skipif():
            pass

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.xfail(reason="known broken")
        def test_xfail():
            assert inside()
            assert 0

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.xfail(reason="lenient", strict=False)
        def test_xpass_lenient():
            assert inside()

        @pytest.mark.isolate("fakeenv")
        @pytest.mark.xfail(reason="must fail", strict=True)
        def test_xpass_strict():
            assert inside()
    """))
    result = project.run("-rsxX")
    result.assert_outcomes(skipped=2, xfailed=1, xpassed=1, failed=1)
    result.stdout.fnmatch_lines_random([
        "SKIPPED [[]1[]] test_project.py:*: not today",
        "SKIPPED [[]1[]] test_project.py:*: skipif inside",
        "XFAIL test_project.py::test_xfail - known broken",
        "XPASS test_project.py::test_xpass_lenient - lenient",
        "*[[]XPASS(strict)[]] must fail*",
    ])


def test_captured_output_and_logging_of_failing_test(project: Project) -> None:
    project.tests(src("""
        log = logging.getLogger("inner")

        @pytest.mark.isolate("fakeenv")
        def test_noisy():
            print("to stdout", os.getpid())
            print("to stderr", file=sys.stderr)
            log.warning("a log record")
            assert False, "boom"

        @pytest.mark.isolate("fakeenv")
        def test_quiet_pass():
            print("stdout of a passing test")
    """))
    result = project.run()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*Captured stdout call*",
        "to stdout *",
        "*Captured stderr call*",
        "to stderr",
        "*Captured log call*",
        "WARNING *inner*a log record*",
    ])
    result.stdout.no_fnmatch_line("*stdout of a passing test*")


def test_exitfirst_stops_after_first_failure(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_1():
            pass

        @pytest.mark.isolate("fakeenv")
        def test_2():
            assert 0

        @pytest.mark.isolate("fakeenv")
        def test_3():
            pass

        @pytest.mark.isolate("fakeenv")
        def test_4():
            pass
    """))
    result = project.run("-x", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    result.stdout.no_fnmatch_line("*test_3*PASSED*")


def test_keyword_selection_and_verbose_ids(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_alpha():
            assert inside()

        @pytest.mark.isolate("fakeenv")
        def test_beta():
            assert inside()

        @pytest.mark.isolate("fakeenv")
        def test_alphabet():
            assert inside()
    """))
    result = project.run("-v", "-k", "alpha")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines_random([
        "test_project.py::test_alpha PASSED*",
        "test_project.py::test_alphabet PASSED*",
    ])
    result.stdout.no_fnmatch_line("*test_beta*")


def test_last_failed_reruns_only_the_failed(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_good():
            pass

        @pytest.mark.isolate("fakeenv")
        def test_bad():
            assert 0

        @pytest.mark.isolate("fakeenv")
        def test_good_too():
            pass
    """))
    first = project.run()
    first.assert_outcomes(passed=2, failed=1)
    second = project.run("--lf", "-v")
    second.assert_outcomes(failed=1)
    second.stdout.fnmatch_lines(["*collected 1 item*", "run-last-failure: rerun previous 1 failure*",
                                 "test_project.py::test_bad FAILED*"])
    second.stdout.no_fnmatch_line("*test_good*PASSED*")


def test_parametrized_class_based_and_conftest_fixtures(project: Project) -> None:
    project.pytester.makeconftest(textwrap.dedent("""
        import os
        import pytest
        from fake_backend import FakeBackend, UnavailableFakeBackend

        @pytest.hookimpl(optionalhook=True)
        def pytest_isolate_backends():
            return {"fake": FakeBackend, "fake-missing": UnavailableFakeBackend}

        @pytest.fixture
        def where():
            return "agent" if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") == "1" else "host"

        @pytest.fixture(params=["p", "q"])
        def letter(request):
            return request.param
    """))
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_param(n, where):
            assert where == "agent"
            assert n != 3

        @pytest.mark.isolate("fakeenv")
        def test_fixture_params(letter, where):
            assert where == "agent" and letter in "pq"

        @pytest.mark.isolate("fakeenv")
        class TestGroup:
            def test_method(self, where):
                assert where == "agent"

            def test_other(self):
                assert inside()
    """))
    result = project.run("-v")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines_random([
        "test_project.py::test_param[[]1[]] PASSED*",
        "test_project.py::test_param[[]2[]] PASSED*",
        "test_project.py::test_param[[]3[]] FAILED*",
        "test_project.py::test_fixture_params[[]p[]] PASSED*",
        "test_project.py::test_fixture_params[[]q[]] PASSED*",
        "test_project.py::TestGroup::test_method PASSED*",
        "test_project.py::TestGroup::test_other PASSED*",
    ])
    result.stdout.fnmatch_lines(["E*assert 3 != 3"])


def test_unmarked_tests_stay_on_the_host(project: Project) -> None:
    project.tests(src("""
        def test_local():
            assert not inside()

        @pytest.mark.isolate("fakeenv")
        def test_remote():
            assert inside()
    """))
    result = project.run("-v")
    result.assert_outcomes(passed=2)


def test_crashing_test_fails_and_run_goes_on(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_crash():
            os._exit(3)

        @pytest.mark.isolate("fakeenv")
        def test_next():
            assert inside()
    """))
    result = project.run("-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["test_project.py::test_crash FAILED*", "test_project.py::test_next PASSED*"])
    result.stdout.fnmatch_lines(["*exited with status 3*"])


def test_timeout_fails_the_test_and_run_goes_on(project: Project) -> None:
    project.tests(src("""
        import time

        @pytest.mark.isolate("fakeenv", timeout=1)
        def test_hang():
            time.sleep(30)

        @pytest.mark.isolate("fakeenv")
        def test_next():
            assert inside()
    """))
    started = time.monotonic()
    result = project.run("-v")
    elapsed = time.monotonic() - started
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["test_project.py::test_hang FAILED*", "test_project.py::test_next PASSED*"])
    result.stdout.fnmatch_lines(["*timeout*"])
    assert elapsed < 15, f"the run took {elapsed:.1f}s: the hanging test was not cut at its timeout"


def test_unavailable_backend_skips_with_reason(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("missing")
        def test_needs_missing():
            pass

        @pytest.mark.isolate("fakeenv")
        def test_fine():
            pass
    """))
    result = project.run("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] *backend 'fake-missing' is unavailable: the fake engine is not installed; "
        "install it with: apt-get install fake-engine",
    ])


def test_unavailable_backend_fails_under_strict(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("missing")
        def test_needs_missing():
            pass

        @pytest.mark.isolate("missing")
        def test_needs_missing_too():
            pass
    """))
    result = project.run("--isolate-strict")
    # DESIGN: --isolate-strict turns the skip into an error (a failed setup)
    result.assert_outcomes(errors=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_needs_missing *",
        "*the fake engine is not installed*--isolate-strict turns this skip into a failure*",
        "*ERROR at setup of test_needs_missing_too*",
        "*backend 'fake-missing' of environment 'missing' is unavailable (--isolate-strict); "
        "*test_needs_missing shows why",
    ])
    # the whole message (reason and fix) once, not once per test
    errors = result.stdout.str().split("short test summary info")[0]
    assert errors.count("the fake engine is not installed") == 1


def test_backend_hook_without_optionalhook(project: Project) -> None:
    project.pytester.makeconftest(textwrap.dedent("""
        from fake_backend import FakeBackend

        def pytest_isolate_backends():
            return {"fake": FakeBackend}
    """))
    project.pyproject(base='[tool.pytest-isolate.envs.fakeenv]\nbackend = "fake"\n')
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        def test_remote():
            assert inside()
    """))
    result = project.run()
    result.assert_outcomes(passed=1)


def test_killed_environment_fails_the_test_and_is_restarted(project: Project) -> None:
    project.relay_setup()
    project.tests(src("""
        import signal

        @pytest.mark.isolate("fakeenv")
        def test_kill_agent(setup_relayed):
            setup_relayed()  # the host has the setup report: the agent dies in the call
            # the worker's parent is the zygote, whose parent is the agent: kill the
            # whole "environment"
            with open("/proc/%d/stat" % os.getppid()) as f:
                agent = int(f.read().rsplit(")", 1)[1].split()[1])
            os.kill(agent, signal.SIGKILL)
            import time
            time.sleep(10)

        @pytest.mark.isolate("fakeenv")
        def test_after_restart():
            assert inside()
    """))
    started = time.monotonic()
    result = project.run("-v", "--isolate-report", "report.json")
    assert time.monotonic() - started < 30
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["test_project.py::test_kill_agent FAILED*",
                                 "test_project.py::test_after_restart PASSED*"])
    result.stdout.fnmatch_lines(["*_ test_kill_agent _*", "environment 'fakeenv': the agent's stream ended",
                                 "--- environment log tail ---"])
    import json
    report = json.loads((project.path / "report.json").read_text())
    assert report["environments"]["fakeenv"]["starts"] == 2


def test_collection_error_inside_is_reported(project: Project) -> None:
    project.tests(src("""
        if inside():
            raise ImportError("this module cannot be imported in the environment")

        @pytest.mark.isolate("fakeenv")
        def test_x():
            pass

        def test_local():
            pass
    """))
    result = project.run()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*collecting test_project.py inside environment 'fakeenv' failed:*",
        "*ImportError: this module cannot be imported in the environment*",
    ])


def test_test_only_on_the_host_is_reported_not_collected(project: Project) -> None:
    project.tests(src("""
        if not inside():
            @pytest.mark.isolate("fakeenv")
            def test_host_only():
                pass
    """))
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_project.py::test_host_only was not collected inside "
                                 "environment 'fakeenv'; collection differs*"])


def test_isolate_timeout_option(project: Project) -> None:
    project.tests(src("""
        import time

        @pytest.mark.isolate("fakeenv")
        def test_hang():
            time.sleep(30)

        @pytest.mark.isolate("fakeenv", timeout=20)
        def test_marker_wins():
            time.sleep(1.5)
    """))
    started = time.monotonic()
    result = project.run("-v", "--isolate-timeout", "1")
    assert time.monotonic() - started < 20
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*timeout: the test ran longer than 1.0s*"])


def test_under_xdist_workers_share_the_cache(project: Project) -> None:
    project.tests(src("""
        @pytest.mark.isolate("fakeenv")
        @pytest.mark.parametrize("i", range(8))
        def test_many(i):
            assert inside()
    """))
    result = project.pytester.runpytest_subprocess("-n", "2", "--isolate-report", "r.json", timeout=90)
    result.assert_outcomes(passed=8)
    entries = list((project.cache_dir / "fake").iterdir())
    assert len(entries) == 1
    # exactly one of the two workers built the entry: under xdist a worker's progress
    # lines stay in the worker, so count the builds in the workers' provision logs
    builds = [line for log in (project.cache_dir / "runs").glob("*/logs/fakeenv/provision.log")
              for line in log.read_text().splitlines() if line.startswith("fake build of")]
    assert len(builds) == 1, builds
