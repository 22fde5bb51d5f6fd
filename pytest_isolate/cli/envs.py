"""``envs``: the resolved environments, where each comes from, its image and cache state."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

from pytest_isolate.cli.common import (
    Project,
    cache_location,
    dump_json,
    format_age,
    image_pins,
    load_backend,
    out,
    resolve_specs,
    rootfs_key_of,
    table,
)

if TYPE_CHECKING:
    from pytest_isolate.spec import EnvSpec


def cmd_envs(args: argparse.Namespace, project: Project) -> int:
    from pytest_isolate import config
    from pytest_isolate.cache import read_manifest
    from pytest_isolate.spec import EnvSpec

    specs = resolve_specs(project)
    if args.names:
        config.check_env_names(args.names, "envs", specs)
    names = args.names or list(specs)
    root, where = cache_location(args, project)
    pins = image_pins(root, where)
    fields = [f.name for f in dataclasses.fields(EnvSpec) if f.name not in ("name", "sources")]
    result: dict[str, Any] = {}
    for name in names:
        spec = specs[name]
        values: dict[str, Any] = {}
        for key in fields:
            value = getattr(spec, key)
            if key == "options":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            values[key] = {"value": value, "source": spec.source(key)}
        key = rootfs_key_of(spec)
        result[name] = {
            "backend": spec.backend,
            "builtin": name in config.BUILTIN_ENVS or name in config.PYTHON_ENVS,
            "python": spec.python_version(),
            "values": values,
            "rootfs_key": key,
            "rootfs_cached": read_manifest(root / "rootfs" / key) is not None,
            "image_pin": pins.get(spec.image) if spec.image else None,
            "kernel": image_line_of_backend(spec, pins.get(spec.image) if spec.image else None),
        }
    if args.json:
        dump_json({"pyproject": str(project.pyproject) if project.pyproject else None,
                   "cache_dir": str(root), "envs": result})
        return 0
    out(f"project: {project.pyproject or 'no pyproject.toml found (built-in environments only)'}")
    for name, info in result.items():
        origin = "built-in" if info["builtin"] else "pyproject.toml"
        if info["builtin"] and any(not s.startswith("built-in default")
                                   for s in specs[name].sources.values()):
            origin = "built-in, changed in pyproject.toml"
        out()
        out(f"{name}  ({origin})")
        rows = []
        for key, v in info["values"].items():
            value = v["value"]
            shown = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None \
                else str(value)
            rows.append([f"  {key}", shown, v["source"]])
        for line in table(rows):
            out(line)
        if specs[name].image:
            out(f"  {image_line(specs[name].image, info['image_pin'])}")
        if info["kernel"]:
            out(f"  {info['kernel']}")
        if specs[name].image:
            continue
        state = "cached" if info["rootfs_cached"] else "not built yet"
        if info["python"]:
            out(f"  python {info['python']} (Debian {specs[name].release}'s python3)")
        out(f"  rootfs cache key: {info['rootfs_key']} ({state})")
    return 0


def image_line(ref: str | None, pin: dict[str, Any] | None) -> str:
    """What an image reference is pinned to, for `envs`."""
    if pin is None:
        return f"image {ref}: not pulled or checked yet (the first run that uses it does)"
    age = format_age(time.time() - float(pin["last_use"]))
    python = f"python {pin['python']}, " if pin.get("python") else ""
    return (f"image {ref}: pinned at {pin['digest']} ({python}last used {age} ago; "
            f"`docker pull {ref}` picks up a moved tag)")



def image_line_of_backend(spec: EnvSpec, pin: dict[str, Any] | None) -> str | None:
    """What spec's backend says of how it runs spec's image (a VM: which kernel it boots)."""
    if spec.image is None:
        return None
    cls, _ = load_backend(spec.backend)
    return cls.describe_image(spec, pin) if cls is not None else None
