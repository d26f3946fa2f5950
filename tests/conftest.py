from __future__ import annotations

import os

import pytest

from dcplan.manager import reset_plugin_manager


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """Every test runs in an empty directory with no DCPLAN_* variables."""
    for key in list(os.environ):
        if key.startswith("DCPLAN_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
