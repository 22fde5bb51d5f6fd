"""Who owns what a run leaves outside the cache, and whether that owner still runs.

Everything a run creates outside the cache (containers, schroot sessions, cgroups, QEMU
processes, its directory under ``<cache>/runs``) names its owner, so that a later run or
`cache gc` can remove what a killed run left.  One rule decides for every reaper, for
`cache gc` and for the manager's pruner: an owner is a process named by its pid AND its
start time.  A pid alone is not enough: after the owner dies the kernel can give its pid
to an unrelated process, which would keep a leftover "alive" forever -- or, for a check
that trusts a recorded pid blindly, make a live run's things look like someone else's.

The carriers keep the formats older versions wrote (so their leftovers are still reaped);
this module is their one reader:

- a JSON label ``{"pid": ..., "start": ...}`` (lxc's label file, schroot's definition,
  the run directory's owner file): `Owner.label` / `Owner.from_label`;
- a name ``PID-START[-...]`` (host cgroups, QEMU socket directories): `Owner.name` /
  `Owner.from_name`;
- separate fields (docker labels): `Owner.from_fields`;
- a run id ``YYYYmmdd-HHMMSS-PID[-suffix]`` (lxc, schroot and QEMU names), which holds
  only a pid: `run_owner` finds the start time in the run's directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The file in a run's directory that names the process running it.
OWNER_FILE = "owner.json"

#: A run id's stamp and pid (what identifies the run), for patterns that find one in text.
RUN_STEM = r"(\d{8}-\d{6})-(\d+)"
_RUN_ID = re.compile(RUN_STEM + r"(?:-(.+))?")
_OWNER_NAME = re.compile(r"(\d+)(?:-(\d+)(?:-.*)?)?")


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it is gone.

    A zombie counts as gone (e.g. a crashed xdist worker not yet waited for).  With the
    pid, it identifies a process: a reused pid has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _number(value: object) -> int | None:
    """An int, or the decimal text of one (labels are strings); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that made something: its pid and its start time (None: not recorded)."""

    pid: int
    start: int | None

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()  # asked each time: a forked child is another owner
        return cls(pid, process_start_time(pid))

    def alive(self) -> bool:
        """The one liveness rule: the pid runs (not a zombie) with the recorded start time.

        An unknown start time (a carrier that holds only the pid, or an older label) is
        judged by the pid alone, conservatively: a reused pid keeps the leftover until
        the pid is free again, which leaks for a while but never removes a live run's
        things."""
        current = process_start_time(self.pid)
        if current is None:
            return False
        return self.start is None or current == self.start

    # ------------------------------------------------------------ carriers
    @classmethod
    def from_fields(cls, pid: object, start: object) -> Owner | None:
        """The owner in a pid and a start time as any carrier holds them (ints or their
        decimal text); None when there is no valid pid: nothing to judge."""
        number = _number(pid)
        if number is None or number <= 0:
            return None
        return cls(number, _number(start))

    def label(self) -> dict[str, Any]:
        """The JSON form (merged into a backend's own label with more fields)."""
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_label(cls, label: object) -> Owner | None:
        """The owner in a parsed JSON label; None when it names none."""
        if not isinstance(label, Mapping):
            return None
        return cls.from_fields(label.get("pid"), label.get("start"))

    @property
    def name(self) -> str:
        """The form used inside names: ``PID-START`` (``PID`` when the start is unknown)."""
        return str(self.pid) if self.start is None else f"{self.pid}-{self.start}"

    @classmethod
    def from_name(cls, text: str) -> Owner | None:
        """The owner at the start of a name: ``PID-START[-more]``, or a bare ``PID`` (what
        older versions wrote into QEMU socket directories); None for anything else."""
        m = _OWNER_NAME.fullmatch(text.strip())
        return cls.from_fields(m.group(1), m.group(2)) if m else None


@dataclasses.dataclass(frozen=True)
class RunId:
    """A run's id: ``YYYYmmdd-HHMMSS-PID[-suffix]`` (suffix: the xdist worker, "shell")."""

    stamp: str
    pid: int
    suffix: str = ""

    @classmethod
    def create(cls, suffix: str = "") -> RunId:
        """The id of a run of this process, starting now."""
        return cls(time.strftime("%Y%m%d-%H%M%S"), os.getpid(), suffix)

    @classmethod
    def parse(cls, text: str) -> RunId | None:
        """The run id that text is, or starts with (lxc, schroot and QEMU names continue
        with the environment's name, which then lands in suffix: only the stamp and the
        pid identify the run).  None when text does not start with a run id."""
        m = _RUN_ID.fullmatch(text)
        return cls(m.group(1), int(m.group(2)), m.group(3) or "") if m else None

    @property
    def stem(self) -> str:
        """The part that identifies the process's run: its stamp and its pid."""
        return f"{self.stamp}-{self.pid}"

    def __str__(self) -> str:
        return f"{self.stem}-{self.suffix}" if self.suffix else self.stem


def record_run(run_dir: Path) -> None:
    """Write this process's owner into run_dir (once), so that the run's liveness is
    judged by pid and start time, though its id carries only the pid."""
    path = run_dir / OWNER_FILE
    if path.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{OWNER_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(Owner.me().label()))
    os.replace(tmp, path)  # a reader never sees half a label


def _recorded_owner(run_dir: Path, run: RunId) -> Owner | None:
    try:
        label = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    owner = Owner.from_label(label)
    return owner if owner is not None and owner.pid == run.pid else None


def run_owner(run: RunId, runs_dir: Path | None) -> Owner:
    """The process running run: its recorded owner from its directory under runs_dir.

    When no directory records it (the run used another cache directory, it was made by
    an older version, or it has not written the file yet) the start time is unknown and
    the owner is judged by its pid alone (see Owner.alive)."""
    if runs_dir is not None:
        for run_dir in runs_dir.glob(f"{run.stem}*"):
            other = RunId.parse(run_dir.name)
            if other is not None and other.stem == run.stem:
                owner = _recorded_owner(run_dir, run)
                if owner is not None:
                    return owner
    return Owner(run.pid, None)


def run_gone(name: str, runs_dir: Path | None) -> bool:
    """True when name starts with a run id whose owner no longer runs.

    A name that does not start with a run id is never judged gone: it is not ours, or
    of a format this version does not know, and removing a live run's things is worse
    than leaving a leftover."""
    run = RunId.parse(name)
    return run is not None and not run_owner(run, runs_dir).alive()


def run_dir_finished(run_dir: Path) -> bool:
    """May run_dir (``<cache>/runs/<name>``) be removed: no live process runs it?

    The manager's pruner and `cache gc` both decide with this.  A directory not named
    by a run id ("gc", "doctor": scratch of the CLI's commands) has no run to wait for."""
    run = RunId.parse(run_dir.name)
    if run is None:
        return True
    return not (_recorded_owner(run_dir, run) or Owner(run.pid, None)).alive()
