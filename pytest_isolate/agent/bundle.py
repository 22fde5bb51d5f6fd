"""How the agent's modules leave the package (host side, never shipped).

Inside an environment the agent is one source, sent over the environment's stdin and run
by wire.BOOTSTRAP: ``source()`` joins the shipped modules into it.  Each module keeps its
file name and line numbers (it is compiled on its own, into one namespace shared by all),
so a traceback in an agent's log points at the module's own line.  The modules' relative
imports have nothing to import inside: each becomes ``pass`` on its own line; names are
therefore unique across the shipped modules (tests/unit/test_agent_bundle.py checks).

On the host, the namespace backends' launcher runs on the host's Python without site and
without importing pytest_isolate (whose package imports would cost its start):
``launcher_argv`` loads this directory as a package of its own (``LOADER``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

AGENT_DIR = Path(__file__).resolve().parent

#: The shipped modules, each after the ones it imports at its top.
SHIPPED = ("wire", "mounts", "slots", "harden", "ops", "collect", "workers", "zygote", "server")

#: A relative import statement, one line or parenthesised over several.
_RELATIVE = re.compile(r"^([ \t]*)from \.\w* import (?:\([^)]*\)|[^\n]*)$", re.MULTILINE)

#: Loads AGENT_DIR (argv[1]) as the package ``pytest_isolate_agent`` and runs the
#: launcher's main on the rest of argv.  One line: provisioning logs show argv as one.
LOADER = (
    "import importlib.util as u,sys;d=sys.argv.pop(1);"
    "s=u.spec_from_file_location('pytest_isolate_agent',d+'/__init__.py',"
    "submodule_search_locations=[d]);"
    "m=u.module_from_spec(s);sys.modules[s.name]=m;s.loader.exec_module(m);"
    "from pytest_isolate_agent.launcher import main;sys.exit(main(sys.argv[1:]))"
)


def module_source(name: str) -> str:
    """A shipped module's source as it runs inside: its relative imports made ``pass``,
    each on as many lines as before."""
    text = (AGENT_DIR / (name + ".py")).read_text()

    def blank(match: re.Match[str]) -> str:
        return match.group(1) + "pass" + "\n" * match.group(0).count("\n")

    return _RELATIVE.sub(blank, text)


def source() -> bytes:
    """The one source the bootstrap runs: every shipped module compiled under its own file
    name into the bootstrap's namespace, in SHIPPED's order."""
    parts = ["_sources = (\n"]
    for name in SHIPPED:
        parts.append("    (%r, %r),\n" % ("pytest_isolate/agent/%s.py" % name, module_source(name)))
    parts.append(")\nfor _file, _text in _sources:\n"
                 "    exec(compile(_text, _file, 'exec'), globals())\n"
                 "del _sources, _file, _text\n")
    return "".join(parts).encode()


def launcher_argv(*args: str) -> list[str]:
    """The launcher on the host's own Python, isolated and without site (fast start)."""
    return [sys.executable, "-I", "-S", "-c", LOADER, str(AGENT_DIR), *args]
