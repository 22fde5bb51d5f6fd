"""Names by which the plugin, the manager and the host-plugin adapters find shared state.

Low in the layers (pytest only), so hostplugins.py, which the manager drives, reads
the manager's state without importing the manager or the plugin above it.
"""

from __future__ import annotations

import pytest

#: The IsolateManager's name in the plugin manager (config.pluginmanager.get_plugin).
MANAGER = "isolate-manager"
#: The environment an isolated item runs in; absent for an item that runs on the host.
ENV_KEY = pytest.StashKey[str]()
