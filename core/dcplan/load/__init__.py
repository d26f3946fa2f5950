"""The load side: the planner (:mod:`dcplan.load.planner`), its report
(:mod:`dcplan.load.report`) and the safe unpicklers (:mod:`dcplan.load.safe`).

This package is also the function :func:`dcplan.load` (``dcplan.load(state_dict, path)``):
``dcplan.load`` names both, and Python binds a package onto its parent whenever it is
imported, so the package itself is made callable and forwards to :func:`dcplan.api.load`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableLoadPackage(types.ModuleType):
    def __call__(self, state_dict: Any, path: Any, **kwargs: Any) -> None:
        from dcplan.api import load

        return load(state_dict, path, **kwargs)


sys.modules[__name__].__class__ = _CallableLoadPackage
