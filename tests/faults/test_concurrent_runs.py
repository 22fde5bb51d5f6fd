"""Two runs share a cache: one must never delete or break what the other is using.

Run A holds an environment open (its test sleeps); run B, on the same cache, ends
and prunes old run directories (the manager keeps the 20 most recent).  A's
directory is made the oldest and 20 newer ones are added, so B's pruning reaches
it while A still runs.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from faults_support import find_processes, inner_argv, kill_all, run_id_of, sleep_tag
from shared_support import inner_environ, wait_for

pytestmark = pytest.mark.integration

@pytest.mark.parametrize("env", ["chroot", "schroot"])
def test_a_run_never_prunes_a_live_run(tmp_path: Path, cache_dir: str, env: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(Path(cache_dir) / "rootfs", cache / "rootfs")  # reuse the built root filesystems
    project = tmp_path / "project"
    project.mkdir()
    tag = sleep_tag()
    (project / "test_a.py").write_text(textwrap.dedent(f"""
        import subprocess
        import pytest

        @pytest.mark.isolate({env!r})
        def test_long():
            subprocess.run(["sleep", {tag!r}])
    """))
    (project / "test_b.py").write_text(textwrap.dedent(f"""
        import pytest

        @pytest.mark.isolate({env!r})
        def test_short():
            pass
    """))
    environ = inner_environ()
    base = inner_argv(str(cache))
    with open(tmp_path / "a.out", "wb") as out:
        a = subprocess.Popen([*base, "test_a.py"], cwd=project, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    try:
        wait_for(f"sleep {tag}", lambda: find_processes(f"sleep {tag}"), 120, a)
        run_a = cache / "runs" / run_id_of(str(cache), a.pid)
        old = time.time() - 3600
        os.utime(run_a, (old, old))
        for i in range(20):
            (cache / "runs" / f"20990101-0000{i:02d}-1").mkdir()
        b = subprocess.run([*base, "test_b.py"], cwd=project, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, env=environ, timeout=300, check=False)
        a_dir_after_b = run_a.exists() and (run_a / "logs").exists()
        kill_all(find_processes(f"sleep {tag}"))
        a.wait(120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        kill_all(find_processes(f"sleep {tag}"))
    a_out = (tmp_path / "a.out").read_text(errors="replace")
    assert b.returncode == 0, b.stdout + b.stderr
    assert "INTERNALERROR" not in b.stdout + b.stderr
    assert a_dir_after_b
    assert a.returncode == 0, a_out
