"""``warm``: the keepers of warm environments (``--isolate-warm``) and how to stop them."""

from __future__ import annotations

import argparse
import time

from pytest_isolate.cli.common import Project, cache_location, dump_json, format_age, out, plural, table


def cmd_warm(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate import warm

    root, where = cache_location(args, project)
    found = warm.keepers(root)
    if args.stop:
        stopped = [status for status in found if warm.stop_keeper(status)]
        if args.json:
            dump_json({"cache_dir": str(root), "stopped": stopped})
        else:
            out(f"stopped {plural(len(stopped), 'keeper', 'keepers')} of {root} ({where})")
        return 0
    if args.json:
        dump_json({"cache_dir": str(root), "cache_dir_source": where, "keepers": found})
        return 0
    out(f"cache: {root} ({where})")
    if not found:
        out("no warm environments (pytest --isolate-warm SECONDS keeps one for the next run)")
        return 0
    now = time.time()
    rows = [["KEY", "ENV", "BACKEND", "PID", "SPARE", "RUNS", "ENDS IN", "PROJECT"]]
    for status in found:
        rows.append([status["key"][:12], status["env"], status["backend"],
                     str(status["owner"]["pid"]), "ready" if status["spare"] else "starting",
                     str(status["served"]),
                     "after its run" if status["lent"] else format_age(status["deadline"] - now),
                     status["rootdir"]])
    for line in table(rows):
        out(line)
    out("stop them with: pytest-isolate warm --stop")
    return 0
