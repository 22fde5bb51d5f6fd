"""Fixture scopes inside environments (issue 18), on the real backends.

With reset = "test", an environment's session-, package-, module- and class-scoped
fixtures are set up once in its zygote (agent.Zygote) and torn down there at the end
of their scope, while every test still starts from the zygote's layer over the
pristine root and loses its own writes.  The inner project prints an EVENT line at
every set-up and teardown; run with -rA, the host shows them in the tests' captured
output, which is how these tests count them (and how a user would see them).
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 900
BACKENDS = ["chroot", "docker", "lxc", "schroot", "qemu_vm"]

CONFTEST = textwrap.dedent(
    '''
    import os, sqlite3, subprocess, sys
    from concurrent.futures import ThreadPoolExecutor
    import pytest

    def event(name):
        print("EVENT %s %d" % (name, os.getpid()))

    SERVER = """
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
    print(s.getsockname()[1], flush=True)
    while True:
        c, _ = s.accept(); c.sendall(c.recv(64)); c.close()
    """

    @pytest.fixture(scope="session")
    def db():
        event("db-setup")
        path = "/var/tmp/isolate-session.sqlite"
        assert not os.path.exists(path)  # a fresh environment, set up once
        con = sqlite3.connect(path)
        con.execute("create table t (x)")
        con.execute("insert into t values (1)")
        con.commit()
        con.close()
        yield path
        event("db-teardown")

    @pytest.fixture(scope="session")
    def server():
        event("server-setup")
        proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
        port = int(proc.stdout.readline())
        yield port
        proc.kill()
        proc.wait()
        event("server-teardown")

    @pytest.fixture(scope="module")
    def moddir(request):
        event("moddir-setup")
        d = "/srv/isolate-module-" + request.module.__name__
        os.makedirs(d)
        with open(d + "/made-by-module", "w") as f:
            f.write(request.module.__name__)
        yield d
        event("moddir-teardown")

    @pytest.fixture(scope="class")
    def klass():
        event("class-setup")
        yield
        event("class-teardown")

    @pytest.fixture(scope="session")
    def pool():
        event("pool-setup")
        ex = ThreadPoolExecutor(2)
        ex.submit(int).result()  # a worker thread is running now
        yield ex
        ex.shutdown()
        event("pool-teardown")

    @pytest.fixture(scope="session")
    def broken():
        event("broken-setup")
        raise RuntimeError("the database is down")
    '''
)

TEST_A = textwrap.dedent(
    '''
    import os, socket, sqlite3
    import pytest

    pytestmark = pytest.mark.isolate("ENV")

    @pytest.mark.parametrize("i", range(3))
    def test_session(db, server, moddir, i):
        con = sqlite3.connect(db)
        assert con.execute("select count(*) from t").fetchone()[0] == 1
        con.execute("insert into t values (2)")  # the test's own write: gone after it
        con.commit()
        c = socket.create_connection(("127.0.0.1", server), timeout=10)
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        with open(moddir + "/made-by-module") as f:
            assert f.read() == "test_a"
        assert not os.path.exists("/etc/isolate-written-by-a-test")
        with open("/etc/isolate-written-by-a-test", "w") as f:
            f.write("x")
        # the session processes run, but not in this test's PID namespace
        event = "test-%d" % os.getpid()
        print("EVENT", event)

    def test_uses_broken(broken):
        pass

    def test_uses_broken_too(broken):
        pass

    class TestClass:  # last: its passed teardown shows the module's teardown output
        def test_one(self, klass, db):
            assert os.path.exists(db)

        def test_two(self, klass, db):
            assert os.path.exists(db)
    '''
)

TEST_B = textwrap.dedent(
    '''
    import os
    import pytest

    pytestmark = pytest.mark.isolate("ENV")

    def test_module_a_is_torn_down(moddir, db):
        # module test_a's fixture ended before this module's started; its files stay,
        # as on the host (its teardown does not remove them)
        assert os.path.exists("/srv/isolate-module-test_a/made-by-module")
        assert not os.path.exists("/etc/isolate-written-by-a-test")

    def test_pool(pool):
        assert pool.submit(lambda: 41 + 1).result(timeout=10) == 42

    def test_pool_again(pool):
        assert pool.submit(lambda: 42).result(timeout=10) == 42
    '''
)


@pytest.fixture(scope="session")
def cache_dir(pytestconfig: pytest.Config) -> Iterator[str]:
    manager = pytestconfig.pluginmanager.get_plugin("isolate-manager")
    assert manager is not None
    yield str(manager.cache.root)


def events(result: pytest.RunResult) -> Counter[str]:
    return Counter(m.group(1) for line in result.outlines
                   if (m := re.match(r"EVENT ([a-z]+-[a-z]+) \d+$", line)))


@pytest.mark.parametrize("env", BACKENDS)
def test_fixture_scopes_inside(pytester: pytest.Pytester, cache_dir: str, env: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_a=TEST_A.replace("ENV", env), test_b=TEST_B.replace("ENV", env))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "--isolate-strict", f"--isolate-cache-dir={cache_dir}",
        "-p", "no:randomly", timeout=RUN_TIMEOUT)
    result.assert_outcomes(passed=8, errors=2)
    counts = events(result)
    # once per environment, torn down once (where it was set up: the same pid)
    assert counts["db-setup"] == counts["db-teardown"] == 1, counts
    assert counts["server-setup"] == counts["server-teardown"] == 1, counts
    assert counts["moddir-setup"] == counts["moddir-teardown"] == 2, counts
    assert counts["class-setup"] == counts["class-teardown"] == 1, counts
    # a failing set-up is tried once; both of its tests error with its traceback
    assert counts["broken-setup"] == 1, counts
    assert len([line for line in result.outlines
                if line.startswith("E  ") and "the database is down" in line]) == 2
    # the pool's thread cannot survive the fork: it is named, torn down and set up per
    # test from then on (once in the zygote, then once per test)
    assert counts["pool-setup"] == counts["pool-teardown"] == 3, counts
    result.stdout.fnmatch_lines(["*setting up 'pool' (session-scoped) started threads*"])
    pids = {k: v for k, v in (re.match(r"EVENT ([a-z]+-[a-z]+) (\d+)$", line).groups()
                              for line in result.outlines
                              if re.match(r"EVENT [a-z]+-[a-z]+ \d+$", line))}
    assert pids["db-setup"] == pids["db-teardown"]
