"""The agent: what runs inside an environment, and the host's launcher of namespace backends.

Standard library only, Python 3.9+, and nothing of pytest_isolate: these modules are
shipped into every environment as one source (bundle.py) and run there by the bootstrap
(wire.BOOTSTRAP).  One module per role:

- wire.py: the frame format and the bootstrap -- what both sides run;
- mounts.py: namespaces, mounts and the mapped root -- the launcher's and the workers';
- harden.py: capabilities, seccomp and masked paths of a worker;
- ops.py: commands and files (exec, get, put);
- collect.py: which environments a test runs in, one item per environment -- the host's
  pytest and the pytest inside split items with the same code;
- workers.py, zygote.py, server.py: the agent server, its workers and zygote, and its
  pytest plugin;
- launcher.py: the host side of the namespace backends (run on the host's Python, never
  shipped);
- bundle.py: how these modules leave the package (host only, never shipped).

This file imports nothing: the host imports the one module it needs, and the launcher
loads this directory as a package of its own without pytest_isolate (bundle.LOADER).
"""
