"""Collection rules both sides run: which environments a test runs in, and one copy of
an item per environment -- the host's pytest and the pytest inside split items alike, so
node ids, -k and --lf agree on both sides (the host imports this module)."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

#: Fixtures that drive environments from the host: a test using one stays on the host.
HOST_FIXTURES = frozenset(("isolate_env", "chroot", "schroot", "lxc", "docker", "qemu_vm",
                           "arm64_vm"))


def isolate_targets(marker_args: Sequence[Any], default_envs: Sequence[str],
                    fixturenames: Sequence[str] = ()) -> List[str]:
    """Environments a test runs in: its marker's, else the run-wide default.

    An unmarked test that uses an environment fixture is a host-side driver: the
    run-wide default (--isolate-env) does not move it inside.
    """
    if marker_args:
        return [str(a) for a in marker_args]
    if HOST_FIXTURES.intersection(fixturenames):
        return []
    return list(default_envs)


def parametrize_envs(metafunc: Any, default_envs: Sequence[str]) -> None:
    """One item per environment when a test has several (shared by host and agent)."""
    marker = metafunc.definition.get_closest_marker("isolate")
    envs = isolate_targets(marker.args if marker else (), default_envs, metafunc.fixturenames)
    if len(envs) > 1:
        if "isolate_target" not in metafunc.fixturenames:
            metafunc.fixturenames.append("isolate_target")
        metafunc.parametrize("isolate_target", envs, ids=envs, indirect=True)


_TARGET_KEY: Any = None


def target_key() -> Any:
    """The stash key holding the environment of an item copy made by split_items."""
    global _TARGET_KEY
    if _TARGET_KEY is None:
        import pytest

        _TARGET_KEY = pytest.StashKey()
    return _TARGET_KEY


def item_target(item: Any) -> Optional[str]:
    """The environment an item was split for: its copy's, else its isolate_target param."""
    env = item.stash.get(target_key(), None)
    if env is not None:
        return str(env)
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "isolate_target" in callspec.params:
        return str(callspec.params["isolate_target"])
    return None


def env_nodeid(nodeid: str, env: str) -> str:
    """The node id of an item's copy for env, spelled as parametrize spells it:
    ``t`` -> ``t[env]``, ``t[a]`` -> ``t[a-env]``."""
    tail = nodeid.rpartition("::")[2]
    if tail.endswith("]") and "[" in tail:
        return nodeid[:-1] + "-" + env + "]"
    return nodeid + "[" + env + "]"


def copy_item_for_env(item: Any, env: str) -> Any:
    """A copy of item that differs in its node id (``[env]``), its keywords (``-k env``
    selects it), its stash (which holds env), user properties and report sections.

    ``name`` stays: a unittest TestCaseFunction finds its method by name, and doctest
    and plugin items have constructors of their own, so no constructor is called again.
    Raises ValueError for an item whose node id cannot be changed this way.
    """
    import copy

    nodeid = env_nodeid(item.nodeid, env)
    new = copy.copy(item)
    node_id = getattr(item, "_id", None)
    if node_id is not None and hasattr(type(node_id), "parse"):  # pytest >= 9: a NodeId
        new._id = type(node_id).parse(nodeid)
    else:
        new._nodeid = nodeid
    if new.nodeid != nodeid:
        raise ValueError("%s defines its own node id (%r), so no copy per environment can "
                         "carry the environment in its id" % (type(item).__name__, new.nodeid))
    try:
        keywords = type(item.keywords)(new)
    except TypeError:
        keywords = {}
    own = getattr(item.keywords, "_markers", None)
    for key in (own if isinstance(own, dict) else list(item.keywords)):
        keywords[key] = item.keywords[key]
    keywords[env] = True
    new.keywords = keywords
    new.own_markers = list(item.own_markers)
    new.extra_keyword_matches = set(item.extra_keyword_matches) | {env}
    stash = type(item.stash)()
    storage = getattr(item.stash, "_storage", None)
    if isinstance(storage, dict):
        stash._storage.update(storage)
    new.stash = stash
    if hasattr(item, "_store"):
        new._store = stash
    new.user_properties = list(getattr(item, "user_properties", []))
    new._report_sections = []
    if isinstance(getattr(item, "fixturenames", None), list):
        new.fixturenames = list(item.fixturenames)
    if hasattr(new, "_initrequest"):  # Function, TestCaseFunction, DoctestItem: a request of its own
        new._initrequest()
    stash[target_key()] = env
    return new


def split_items(nodes: List[Any], default_envs: Sequence[str]) -> Tuple[List[Any], List[str]]:
    """One copy per environment of every item with several environments that
    parametrize_envs did not split: unittest TestCase methods, doctests, items a plugin
    collects (shared by host and agent, so node ids match on both sides).

    nodes is a collector's result (collectors in it pass unchanged).  Returns the new
    list and, for each item that cannot be split, "nodeid: reason".
    """
    import pytest

    result: List[Any] = []
    problems: List[str] = []
    for node in nodes:
        if not isinstance(node, pytest.Item) or item_target(node) is not None:
            result.append(node)
            continue
        marker = node.get_closest_marker("isolate")
        envs = isolate_targets(marker.args if marker else (), default_envs,
                               getattr(node, "fixturenames", ()) or ())
        if len(envs) < 2:
            result.append(node)
            continue
        try:
            copies = [copy_item_for_env(node, env) for env in envs]
        except Exception as exc:
            problems.append("%s (%s): %s: %s" % (node.nodeid, type(node).__name__,
                                                 type(exc).__name__, exc))
            result.append(node)
            continue
        result.extend(copies)
    return result, problems
