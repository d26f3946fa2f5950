"""dcplan-empty-load: load a DCP checkpoint into an empty dict, and ``dcplan convert``.

The state dict, nested structure included, is rebuilt from the checkpoint's metadata;
only the selected tensors are allocated (:mod:`dcplan_empty_load.loader`)::

    from dcplan_empty_load import load_checkpoint

    sd = load_checkpoint("ckpt/")                  # everything
    model = load_checkpoint("ckpt/", keys=["model"])  # everything under "model"

The plugin also adds the ``dcplan convert`` command (:mod:`dcplan_empty_load.cli`):
DCP to a ``torch.save`` file or Hugging Face safetensors shards, and back.

The names are imported on first use, so that ``dcplan --help`` (which imports
:mod:`dcplan_empty_load.cli`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dcplan_empty_load.loader import EmptyLoadPlanner, KeySelectionError, load_checkpoint, select_keys

__all__ = ["EmptyLoadPlanner", "KeySelectionError", "load_checkpoint", "select_keys"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dcplan_empty_load.loader"), name)
    raise AttributeError(f"module 'dcplan_empty_load' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
