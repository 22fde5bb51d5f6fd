"""Progress messages of long work (building root filesystems, installing dependencies)."""

from __future__ import annotations


class Heartbeat(str):
    """A progress message that the next one replaces ("12s: Unpacking python3 ...").

    A plain ``str`` to every progress callable; the pytest plugin's reporter rewrites one
    terminal line with it, and prints it as a line of its own where output is a log (not a
    terminal, or CI set), so CI logs keep every step."""
