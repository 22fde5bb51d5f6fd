"""The next test's worker is forked while the current test runs (issue 13), and only when
no fixture changes under the running test (issue 18's scopes keep their host meaning).

The inner tests print EVENT lines with CLOCK_BOOTTIME stamps (the clock /proc's process
start times count in); run with -rA, the host shows them in the captured output.
"""

from __future__ import annotations

import re
import textwrap

import pytest

pytestmark = pytest.mark.integration

TESTS = textwrap.dedent(
    '''
    import os, time
    import pytest

    pytestmark = pytest.mark.isolate("chroot")

    def now():
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def started():
        """When this test's process was forked (seconds since boot)."""
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")

    def test_slow():
        time.sleep(1.5)
        print("EVENT slow-end %.6f" % now())

    def test_after_slow():
        print("EVENT after-start %.3f" % started())

    @pytest.fixture(scope="module", params=[1, 2])
    def resource(request):
        print("EVENT resource%d-setup %.6f" % (request.param, now()))
        yield request.param
        print("EVENT resource%d-teardown %.6f" % (request.param, now()))

    def test_uses(resource):
        time.sleep(1.0)
        print("EVENT uses%d-end %.6f" % (resource, now()))
    '''
)


def stamps(outlines: list[str]) -> dict[str, float]:
    found = {}
    for line in outlines:
        m = re.match(r"EVENT ([a-z0-9]+-[a-z]+) ([0-9.]+)$", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def test_next_worker_is_ready_but_fixtures_never_change_under_a_test(
        pytester: pytest.Pytester, session_cache: str) -> None:
    pytester.makepyfile(test_pre=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                           "-rA", "--isolate-strict",
                                           f"--isolate-cache-dir={session_cache}", timeout=600)
    result.assert_outcomes(passed=4)
    t = stamps(result.outlines)
    assert len(t) == 8, result.outlines[-60:]
    # forked ahead: the second test's process existed well before the first one ended
    assert t["after-start"] < t["slow-end"] - 0.5, t
    # a module fixture with another parameter is torn down only after the test that uses
    # the first one ended, and set up again after that (as on the host)
    # (the teardown and the next setup run one after the other in one process: they can share
    # a clock reading, hence <=)
    assert t["uses1-end"] < t["resource1-teardown"] <= t["resource2-setup"] < t["uses2-end"], t
    assert t["resource1-setup"] < t["uses1-end"], t
