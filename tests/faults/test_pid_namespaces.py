"""Each test's PID namespace (reset = "test"): the zygote forks the test's worker into a
namespace of its own, whose PID 1 is a clone sharing the zygote's memory (agent
PidNamespaces, mounts.pause_init).  What a test leaves running ends when the test ends,
not when the environment does; what a session fixture starts in the zygote lives on
for the tests after it.

Each case is a generated project run by a pytest subprocess against a real backend.
"""

from __future__ import annotations

import pytest
from faults_support import BACKENDS, Inner

pytestmark = pytest.mark.integration

ORPHAN = """
    import os, subprocess, sys, time
    import pytest

    ENV = {env!r}
    # a process that, still alive 2.5 s after its start, writes a file into the project
    # (writable here); the test that starts it ends long before that
    WITNESS = (
        "import os, time; time.sleep(2.5); "
        "open(os.path.join(%r, 'survived-' + str(os.getpid())), 'w').close()" % os.getcwd()
    )

    @pytest.mark.isolate(ENV)
    def test_a_leaves_an_orphan():
        assert os.getpid() == 2  # PID 1 is the namespace's, not the test
        subprocess.Popen([sys.executable, "-c", WITNESS], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    @pytest.mark.isolate(ENV)
    def test_b_outlives_it():
        # the environment (and the zygote) stay up well past the witness's 2.5 s
        time.sleep(5)
        assert os.getpid() == 2
"""


@pytest.mark.parametrize("env", BACKENDS)
def test_what_a_test_leaves_running_ends_with_the_test(inner: Inner, env: str) -> None:
    inner.write("pyproject.toml", f"""
        [tool.pytest-isolate.envs.{env}]
        rootdir_writable = true
    """)
    inner.write("test_orphan.py", ORPHAN.format(env=env))
    result = inner.run(timeout=240)
    result.assert_outcomes(passed=2)
    survivors = sorted(p.name for p in inner.path.glob("survived-*"))
    assert survivors == [], survivors


SERVER = """
    import socket, subprocess, sys, time
    import pytest

    ENV = {env!r}
    SERVE = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8); "
        "print(s.getsockname()[1], flush=True)\\n"
        "while True:\\n"
        "    c, _ = s.accept(); c.sendall(b'up'); c.close()"
    )

    @pytest.fixture(scope="session")
    def server():
        proc = subprocess.Popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE)
        port = int(proc.stdout.readline())
        yield port
        proc.terminate()
        assert proc.wait(10) == -15  # reaped by its own parent: the zygote's fixture

    def ask(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return c.recv(2)

    @pytest.mark.isolate(ENV)
    def test_a(server):
        assert ask(server) == b"up"

    @pytest.mark.isolate(ENV)
    def test_b(server):
        assert ask(server) == b"up"  # the first test's namespace ended; the server did not

    @pytest.mark.isolate(ENV)
    def test_c(server):
        assert ask(server) == b"up"
"""


@pytest.mark.parametrize("env", BACKENDS)
def test_a_session_fixtures_process_lives_across_tests(inner: Inner, env: str) -> None:
    inner.write("test_server.py", SERVER.format(env=env))
    result = inner.run(timeout=240)
    result.assert_outcomes(passed=3)  # and no error: the teardown's wait saw its exit
