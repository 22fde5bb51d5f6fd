"""Shell completion: argcomplete (the optional ``completion`` extra)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from typing import Any

from pytest_isolate.cli.common import PROG, Parser, UsageError, load_project

#: `completion SHELL` prints argcomplete's script for these shells.
COMPLETION_SHELLS = ("bash", "zsh", "fish")
COMPLETION_INSTALL = "pip install 'pytest-isolate-env[completion]'"
#
# argcomplete rather than shtab: a TAB runs this program, which completes from the same
# parser, so the project's environment names come from the same Python lookup as `envs`
# for bash, zsh and fish alike, with no per-shell code of ours.  The price, starting
# Python per TAB, stays small because the completers load no backend.

#: argcomplete's completers: (prefix, parsed_args, ...) -> candidates (it filters by prefix)
Completer = Callable[..., list[str]]


def import_argcomplete() -> Any:
    try:
        import argcomplete
    except ImportError:
        raise UsageError("shell completion needs the argcomplete package, which is not "
                         f"installed: {COMPLETION_INSTALL}") from None
    return argcomplete


def project_env_names(option: str | None) -> list[str]:
    """The names `envs` lists: the built-in environments and the project's.  Resolved
    without loading backends (no engine's SDK, no daemon), so a TAB stays fast; a project
    whose configuration is broken completes the built-in names."""
    from pytest_isolate import config
    from pytest_isolate.backends import BUILTIN_BACKENDS
    from pytest_isolate.errors import IsolateError

    try:
        project = load_project(option)
        return list(config.resolve_envs(project.table, project.pyproject, BUILTIN_BACKENDS))
    except (IsolateError, UsageError):
        return [*config.BUILTIN_ENVS, *config.PYTHON_ENVS]


def env_names(parsed_args: argparse.Namespace) -> list[str]:
    """The project's environments; --pyproject given before the word counts."""
    return project_env_names(getattr(parsed_args, "pyproject", None))


def complete_envs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    return env_names(parsed_args)


def backend_names(parsed_args: argparse.Namespace) -> list[str]:
    from pytest_isolate.backends import BUILTIN_BACKENDS

    return [*sorted(BUILTIN_BACKENDS), "all"]


def arch_names(parsed_args: argparse.Namespace) -> list[str]:
    from pytest_isolate.spec import ARCH_MACHINES

    return sorted(ARCH_MACHINES)


def comma_list(names: Callable[[argparse.Namespace], Iterable[str]]) -> Completer:
    """Completes a NAME[,NAME...] value: the names not given yet, after the ones given
    (bash does not break words at commas, so the prefix is the whole list so far)."""

    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        head, comma, _last = prefix.rpartition(",")
        given = set(head.split(",")) if comma else set()
        return [head + comma + name for name in names(parsed_args) if name not in given]

    return complete


def with_completer(action: argparse.Action, completer: Completer) -> argparse.Action:
    """argcomplete reads an action's `completer` attribute; argparse ignores it."""
    action.completer = completer  # type: ignore[attr-defined]
    return action


def complete(parser: Parser) -> int:
    """Answer a shell's TAB: argcomplete's protocol (the line in COMP_LINE, the candidates
    written to file descriptor 8), then exit.  Without argcomplete there is nothing to say:
    the shell script mutes stderr, so the message is for `_ARC_DEBUG` runs."""
    try:
        argcomplete = import_argcomplete()
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    argcomplete.autocomplete(parser)  # exits when _ARGCOMPLETE is set
    return 1


def cmd_completion(args: argparse.Namespace) -> int:
    argcomplete = import_argcomplete()
    sys.stdout.write(argcomplete.shellcode([PROG], shell=args.shell))
    return 0
