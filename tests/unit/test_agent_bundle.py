"""The agent package and the one source it ships as (pytest_isolate/agent/bundle.py).

In-process checks of the rules the bundle relies on (standard library only, names unique
across the shipped modules, relative imports only), and a traceback from the bundle that
points at the module's own file and line.  The real agent runs from the bundle in
test_protocol.py and in every backend's tests.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest

from pytest_isolate.agent import bundle

MODULES = sorted(p.stem for p in bundle.AGENT_DIR.glob("*.py") if p.stem != "__init__")
#: imported inside a function, where pytest (and coverage, when asked) is known to be there
LAZY_ALLOWED = {"pytest", "_pytest", "coverage"}


def tree(name: str) -> ast.Module:
    return ast.parse((bundle.AGENT_DIR / f"{name}.py").read_text())


def top_level_names(module: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


@pytest.mark.parametrize("name", MODULES)
def test_agent_modules_import_the_standard_library_and_each_other_only(name: str) -> None:
    module = tree(name)
    top_level = {id(node) for node in module.body}
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue  # a sibling: made `pass` in the bundle
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import)
                     else [str(node.module).split(".")[0]])
            allowed = set(sys.stdlib_module_names) | {"__future__"}
            if id(node) not in top_level:
                allowed |= LAZY_ALLOWED
            assert set(roots) <= allowed, f"{name}.py line {node.lineno} imports {roots}"


def test_names_are_unique_across_the_shipped_modules() -> None:
    """The shipped modules share one namespace inside: a name defined twice would be the
    last module's in all of them."""
    seen: dict[str, str] = {}
    for name in bundle.SHIPPED:
        for defined in top_level_names(tree(name)):
            assert defined not in seen, f"{defined} is defined in {seen[defined]}.py and {name}.py"
            seen[defined] = name


def test_shipped_modules_import_shipped_modules_that_come_before_them() -> None:
    order = list(bundle.SHIPPED)
    for name in bundle.SHIPPED:
        module = tree(name)
        for node in ast.walk(module):  # never the launcher or the bundler: not inside
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in order, f"{name}.py imports {node.module}, not shipped"
        for node in module.body:  # top-level imports run when the module runs
            if isinstance(node, ast.ImportFrom) and node.level:
                assert order.index(str(node.module)) < order.index(name), (name, node.module)


def test_mounts_stands_alone() -> None:
    """schroot's prelude loads mounts.py on its own (before schroot chroots)."""
    assert not [n for n in ast.walk(tree("mounts")) if isinstance(n, ast.ImportFrom) and n.level]


@pytest.mark.parametrize("name", bundle.SHIPPED)
def test_a_shipped_module_keeps_its_lines_and_loses_its_relative_imports(name: str) -> None:
    original = (bundle.AGENT_DIR / f"{name}.py").read_text().splitlines()
    shipped = bundle.module_source(name).splitlines()
    assert len(shipped) == len(original)
    relative = [n for n in ast.walk(ast.parse(bundle.module_source(name)))
                if isinstance(n, ast.ImportFrom) and n.level]
    assert relative == []
    spans = {line for n in ast.walk(tree(name)) if isinstance(n, ast.ImportFrom) and n.level
             for line in range(n.lineno, int(n.end_lineno or n.lineno) + 1)}
    changed = {i + 1 for i, (a, b) in enumerate(zip(original, shipped)) if a != b}
    assert changed <= spans  # nothing but the relative imports changed
    assert changed or not spans


def bundle_namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "pytest_isolate_agent"}
    exec(compile(bundle.source(), "bundle", "exec"), namespace)
    return namespace


def test_the_bundle_holds_the_agent_and_not_the_launcher() -> None:
    namespace = bundle_namespace()
    assert callable(namespace["main"]) and "Agent" in namespace and "Zygote" in namespace
    assert "launch" not in namespace and "probe_root_map" not in namespace


def test_a_traceback_inside_names_the_modules_file_and_line() -> None:
    namespace = bundle_namespace()
    decoder = namespace["FrameDecoder"]()
    with pytest.raises(namespace["ProtocolError"]) as info:
        decoder.feed(b"XX" + b"\0" * 12)
    frame = traceback.extract_tb(info.tb)[-1]
    assert frame.filename == "pytest_isolate/agent/wire.py"
    line = (bundle.AGENT_DIR / "wire.py").read_text().splitlines()[frame.lineno - 1]
    assert "raise ProtocolError" in line


def test_the_launcher_runs_without_pytest_isolate(tmp_path: Path) -> None:
    """The launcher's loader finds its siblings without importing pytest_isolate (which
    would cost its start): a usage error from launcher.main proves the chain ran."""
    probe = bundle.launcher_argv("no-such-command")
    proc = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "usage: launcher launch CONFIG_JSON" in proc.stderr
    assert "\n" not in bundle.LOADER  # logs show a command line as one line (provision.log)
    modules = subprocess.run(
        [*probe[:4], bundle.LOADER.replace("from pytest_isolate_agent.launcher import main;",
                                           "import pytest_isolate_agent.launcher;"
                                           "print(sorted(m for m in sys.modules if 'isolate' in m));"
                                           "main=lambda a:0;"), *probe[5:]],
        capture_output=True, text=True, timeout=60)
    loaded = modules.stdout.strip()
    assert "pytest_isolate_agent.launcher" in loaded and "'pytest_isolate'" not in loaded, loaded


# ------------------------------------------------------------------ the messages


def test_message_refuses_what_the_protocol_does_not_define() -> None:
    from pytest_isolate.agent.wire import MESSAGES, message

    assert message("worker", ch=3, kind="test") == {"op": "worker", "ch": 3, "kind": "test"}
    with pytest.raises(ValueError, match="no message 'wroker'"):
        message("wroker", ch=3)
    with pytest.raises(ValueError, match="message 'runtest' has no field 'nodeID'"):
        message("runtest", nodeID="t.py::t")
    assert all(isinstance(f, frozenset) for f in MESSAGES.values())


def test_every_handler_inside_answers_a_defined_message() -> None:
    """The receivers' op_NAME methods (Agent, WorkerServer, Zygote) and MESSAGES agree."""
    from pytest_isolate.agent.wire import MESSAGES

    handled = set()
    for name in ("server", "workers", "zygote"):
        for node in ast.walk(tree(name)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("op_"):
                handled.add(node.name[3:].replace("_", "-"))
    assert handled and handled <= set(MESSAGES), handled - set(MESSAGES)


def test_no_message_is_built_as_a_raw_dict() -> None:
    """Every message goes through wire.message (checked against MESSAGES at the sender),
    on both sides."""
    package = bundle.AGENT_DIR.parent
    raw = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and any(
                    isinstance(k, ast.Constant) and k.value == "op" for k in node.keys):
                raw.append(f"{path.relative_to(package)}:{node.lineno}")
    assert raw == []


def test_the_protocol_docs_name_every_message() -> None:
    from pytest_isolate.agent.wire import MESSAGES

    docs = (bundle.AGENT_DIR.parents[1] / "docs" / "architecture.md").read_text()
    section = docs[docs.index("## The protocol"):]
    section = section[:section.index("\n## ", 1)]
    missing = [op for op in MESSAGES if f"`{op}" not in section and f"{op} {{" not in section]
    assert missing == []
