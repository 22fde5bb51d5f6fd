"""The command line: ``pytest-isolate doctor | setup | envs | cache ls|gc|rm | shell ENV |
warm | completion SHELL`` -- the parser and the entry point here, one module per command
over the core's APIs (cache.py, envs.py, doctor.py, setup.py, shell.py, warm.py,
completion.py), and
common.py for what they share: the project read by pytest's own rootdir and inifile
rules, the cache's location, the one backend loader, output helpers.

Cheap to import: only the standard library at module level; the engine's
modules (config, cache, backends) are imported by the command that needs them.
Errors are one line, ``pytest-isolate: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pytest_isolate.cli.cache import RUNS_MAX_AGE_DAYS, cmd_cache_gc, cmd_cache_ls, cmd_cache_rm
from pytest_isolate.cli.common import PROG, Parser, Project, UsageError, load_project, parse_days, size_arg
from pytest_isolate.cli.completion import (
    COMPLETION_INSTALL,
    COMPLETION_SHELLS,
    arch_names,
    backend_names,
    cmd_completion,
    comma_list,
    complete,
    complete_envs,
    env_names,
    with_completer,
)
from pytest_isolate.cli.doctor import cmd_doctor
from pytest_isolate.cli.envs import cmd_envs
from pytest_isolate.cli.setup import cmd_setup
from pytest_isolate.cli.shell import cmd_shell
from pytest_isolate.cli.warm import cmd_warm

Handler = Callable[[argparse.Namespace, Project], int]
#: a command that needs no project (completion): it works in any directory
Standalone = Callable[[argparse.Namespace], int]


def with_project(handler: Handler) -> Standalone:
    """A command that reads the project (pytest's rootdir and inifile rules) first."""
    return lambda args: handler(args, load_project(args.pyproject))


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR",
                        help="cache directory (default: the isolate_cache_dir ini key, else "
                             "[tool.pytest-isolate] cache_dir, else "
                             "$PYTEST_ISOLATE_CACHE_DIR, else ~/.cache/pytest-isolate)")
    common.add_argument("--pyproject", metavar="FILE",
                        help="the project's pyproject.toml, as pytest -c FILE (default: "
                             "what pytest finds from the current directory: pytest.ini, "
                             "pyproject.toml, tox.ini or setup.cfg, and the rootdir's "
                             "pyproject.toml)")
    parser = Parser(
        prog=PROG,
        description="Inspect and maintain pytest-isolate: which backends work on this host, "
                    "the resolved environments, the cache of built environments, and a debugging "
                    "shell inside an environment.",
        epilog="Run `pytest-isolate COMMAND --help` for a command's options.",
    )
    from pytest_isolate import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} "
                        f"(distribution pytest-isolate-env)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("doctor", parents=[common],
                       help="which backends work on this host and what to install for the others",
                       description="Report every backend (available or what to install/start), "
                                   "KVM, qemu-user binfmt registrations, user namespaces and the "
                                   "cache. Exit status 0 only when every environment the project's "
                                   "pyproject.toml defines (or `chroot` when it defines none) "
                                   "can run here, 1 otherwise.")
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("envs", parents=[common], help="the resolved environment specs",
                       description="Show every environment (built-in and from pyproject.toml) "
                                   "with each value and where it came from, its root filesystem "
                                   "cache key and whether that is built.")
    with_completer(p.add_argument("names", nargs="*", metavar="ENV",
                                  help="only these environments"), complete_envs)
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    p.set_defaults(handler=cmd_envs)

    p = sub.add_parser("cache", help="list, garbage-collect or remove cached environments",
                       description="The content-addressed cache of built environments.")
    p.set_defaults(help_parser=p)
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    c = csub.add_parser("ls", parents=[common], help="list cache entries",
                        description="List entries: key, kind, spec summary, the project's "
                                    "environments that use it, size, age and last use.")
    c.add_argument("--json", action="store_true", help="print a JSON document instead")
    c.set_defaults(handler=cmd_cache_ls)
    c = csub.add_parser("gc", parents=[common], help="remove old or excess entries",
                        description="Remove what killed runs left outside the cache "
                                    "(containers, LXC containers, schroot sessions, cgroups), "
                                    "the files of warm keepers that have ended, "
                                    "stale build directories of killed runs, log "
                                    "directories of finished runs (older than --max-age, default "
                                    f"{RUNS_MAX_AGE_DAYS:g} days), entries not used for --max-age "
                                    "days, saved VM states a newer state of the same machine "
                                    "replaces, then the least recently used entries until the cache "
                                    "fits --max-size. Entries in use by a running session or "
                                    "being built are never removed.")
    c.add_argument("--max-age", type=parse_days, metavar="DAYS",
                   help="remove entries not used for this many days")
    c.add_argument("--max-size", type=size_arg, metavar="SIZE",
                   help="remove least recently used entries until the total is at most SIZE "
                        "(e.g. 10G, 500M)")
    c.add_argument("--keep-states", action="store_true",
                   help="keep every saved VM state, not only the newest per machine")
    c.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    c.set_defaults(handler=cmd_cache_gc)
    c = csub.add_parser("rm", parents=[common], help="remove entries by key",
                        description="Remove the given entries (a unique key prefix is enough; "
                                    "KIND/KEY picks a kind) or all of them. Entries in use are "
                                    "kept and the exit status is 1.")
    c.add_argument("keys", nargs="*", metavar="KEY", help="entry key, prefix or KIND/KEY")
    c.add_argument("--all", action="store_true", help="remove every entry")
    c.set_defaults(handler=cmd_cache_rm)

    p = sub.add_parser("setup", parents=[common],
                       help="install and start what the project's backends need (root or sudo)",
                       description="Install the system packages (apt: Debian, Ubuntu), enable "
                                   "binfmt for foreign architectures, start the Docker engine and "
                                   "libvirtd, and give --user subordinate id ranges, for the "
                                   "environments the project's pyproject.toml defines (or the "
                                   "built-in chroot), or what --envs / --backends name. What is "
                                   "in place is left alone: a second run does nothing. Needs "
                                   "root; runs the commands through sudo otherwise.")
    with_completer(p.add_argument("--backends", metavar="NAME[,NAME...]",
                                  help="these backends (chroot, docker, podman, lxc, schroot, qemu, or all)"),
                   comma_list(backend_names))
    with_completer(p.add_argument("--envs", metavar="ENV[,ENV...]",
                                  help="what these environments need (their backends and "
                                       "architectures)"),
                   comma_list(env_names))
    with_completer(p.add_argument("--arches", metavar="ARCH[,ARCH...]",
                                  help="also these foreign architectures (Debian names: arm64, "
                                       "armhf, ...)"),
                   comma_list(arch_names))
    p.add_argument("--user", metavar="NAME",
                   help="an unprivileged user for rootless use: subordinate uid/gid ranges, uidmap")
    p.add_argument("--no-packages", action="store_true",
                   help="install nothing: only binfmt, daemons and the user's id ranges")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands (with their reasons) instead of running them")
    p.set_defaults(handler=cmd_setup)

    p = sub.add_parser("shell", parents=[common],
                       help="an interactive shell in a fresh instance of an environment",
                       description="Start a shell (bash, else sh) in a fresh instance of ENV, "
                                   "provisioning it first if needed; the project directory is "
                                   "mounted at the same path and is the working directory, the "
                                   "host's pytest is importable. Writes are discarded on exit. "
                                   "The exit status is the shell's. Every backend: chroot "
                                   "runs the shell directly, the others through the agent.")
    with_completer(p.add_argument("env", metavar="ENV",
                                  help="environment name (see `pytest-isolate envs`)"),
                   complete_envs)
    p.add_argument("argv", nargs="*", metavar="COMMAND",
                   help="run this command instead of a shell; put it after `--` when it has "
                        "options of its own: shell ENV -- sh -c 'echo hi'")
    p.set_defaults(handler=cmd_shell)

    p = sub.add_parser("warm", parents=[common],
                       help="the warm environments kept for the next run (--isolate-warm)",
                       description="List the keepers of warm environments that pytest "
                                   "--isolate-warm SECONDS (or the isolate_warm ini key, or "
                                   "[tool.pytest-isolate] warm) started for this cache: each "
                                   "holds a started instance of one environment for the next "
                                   "run with the same key, and ends after SECONDS without one. "
                                   "--stop ends them now, with their instances.")
    p.add_argument("--stop", action="store_true", help="end every keeper of this cache")
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    p.set_defaults(handler=cmd_warm)

    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh, fish)",
                       description="Print the script that makes TAB complete pytest-isolate's "
                                   "commands, options and the project's environment names. "
                                   "Load it from the shell's startup file: "
                                   'eval "$(pytest-isolate completion bash)" in ~/.bashrc, '
                                   'eval "$(pytest-isolate completion zsh)" in ~/.zshrc (after '
                                   "compinit), pytest-isolate completion fish | source in "
                                   "~/.config/fish/config.fish. Needs the completion extra: "
                                   f"{COMPLETION_INSTALL}.")
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell to print the script for")
    p.set_defaults(standalone=cmd_completion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell's TAB, not a command
        return complete(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after `--` is the command of `shell`
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if extra:
        if args.command != "shell":
            parser.error(f"unexpected arguments after '--': {' '.join(extra)}")
        args.argv = list(args.argv) + extra
    handler: Handler | None = getattr(args, "handler", None)
    command: Standalone | None = (with_project(handler) if handler is not None
                                  else getattr(args, "standalone", None))
    if command is None:
        target: argparse.ArgumentParser = getattr(args, "help_parser", parser)
        target.print_help(sys.stderr)
        return 2
    from pytest_isolate.errors import IsolateError

    try:
        return command(args)
    except (IsolateError, UsageError) as exc:
        first, _, rest = str(exc).partition("\n")
        sys.stderr.write(f"{PROG}: error: {first}\n")
        if rest:
            sys.stderr.write(rest + "\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1
