"""Hook specifications of pytest-isolate (registered through pytest_addhooks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Union

import pluggy

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend

hookspec = pluggy.HookspecMarker("pytest")

BackendRef = Union[str, "type[Backend]"]


@hookspec
def pytest_isolate_backends() -> Mapping[str, BackendRef]:
    """Return the backends a plugin provides: ``{name: Backend subclass or "module:Class"}``.

    A dotted path is imported only when an environment of that backend is
    used.  Built-in backends answer with ``trylast=True``, so a plugin or a
    conftest.py that returns the same name replaces the built-in one.
    """
    raise NotImplementedError
