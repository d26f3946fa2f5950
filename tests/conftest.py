from __future__ import annotations

import os
import sys

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


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where a test writes fake distributions (``_fakedist.make_dist``)."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    for mod in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[mod]
