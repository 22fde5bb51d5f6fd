"""Built-in backends, registered through the same hook a third-party backend uses."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_isolate.backends.base import Backend

#: name -> "module:Class"; imported only when an environment of that kind is used.
BUILTIN_BACKENDS: dict[str, str] = {
    "chroot": "pytest_isolate.backends.chroot:ChrootBackend",
    "docker": "pytest_isolate.backends.docker:DockerBackend",
    "lxc": "pytest_isolate.backends.lxc:LxcBackend",
    "schroot": "pytest_isolate.backends.schroot:SchrootBackend",
    "podman": "pytest_isolate.backends.podman:PodmanBackend",
    "qemu": "pytest_isolate.backends.qemu:QemuBackend",
}


def load_backend_class(ref: Any) -> tuple[type[Backend] | None, str]:
    """A registered backend: its class, or None and why it cannot be loaded.  ref is what
    the pytest_isolate_backends hook answered: a class, or "module:Class" (imported here,
    only when the backend is used)."""
    if not isinstance(ref, str):
        return ref, ""
    module_name, _, cls_name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None, "not implemented in this version of pytest-isolate"
        return None, f"cannot be loaded: Python module {exc.name!r} is missing"
    except Exception as exc:
        return None, f"cannot be loaded: {type(exc).__name__}: {exc}"
    cls = getattr(module, cls_name, None)
    if cls is None:
        return None, f"cannot be loaded: {module_name} has no {cls_name}"
    return cls, ""
