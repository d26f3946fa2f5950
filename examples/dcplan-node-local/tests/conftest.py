from __future__ import annotations

import os
import sys

import pytest

from dcplan.manager import reset_plugin_manager

# rank functions live in _node_local_fns.py next to this file; spawned ranks inherit sys.path
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """Each test runs in an empty directory with no DCPLAN_* variables."""
    for key in list(os.environ):
        if key.startswith("DCPLAN_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
