"""The conversions behind ``dcplan convert``: DCP checkpoint <-> ``torch.save`` file, and DCP -> safetensors.

* :func:`dcp_to_torch_save`: load a DCP checkpoint (or the selected keys / nested
  prefixes) with the empty loader and ``torch.save`` it.
* :func:`torch_save_to_dcp`: ``torch.load`` a state dict and write it as a DCP
  checkpoint in this process.
* :func:`dcp_to_safetensors`: export the tensors to Hugging Face safetensors shards
  with a ``model.safetensors.index.json``, as the Hub expects.

All read safely by default (allow-list ``.metadata``, weights-only objects); ``trust=True``
switches to full pickle (DANGEROUS). An existing output is only replaced with ``force=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from typing import Any

from dcplan.errors import DcplanError

__all__ = ["dcp_to_torch_save", "torch_save_to_dcp", "dcp_to_safetensors", "parse_size"]


def _check_output(path: str, force: bool, *, directory: bool) -> None:
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DcplanError(f"cannot write {path}: the directory {parent} does not exist")
        return
    if directory:
        if not os.path.isdir(path):
            raise DcplanError(f"{path} exists and is not a directory; choose another checkpoint path")
        if os.listdir(path) and not force:
            raise DcplanError(f"{path} exists and is not empty; pass --force to write the checkpoint into it")
    else:
        if os.path.isdir(path):
            raise DcplanError(f"{path} is a directory; give a file name such as {os.path.join(path, 'model.pt')}")
        if not force:
            raise DcplanError(f"{path} exists; pass --force to overwrite it")


def dcp_to_torch_save(
    checkpoint: str, out: str, keys: list[str] | None = None, *, trust: bool = False, force: bool = False
) -> dict[str, Any]:
    """Convert a DCP checkpoint to a ``torch.save`` file (written atomically). Returns the state dict."""
    import torch

    from dcplan_empty_load.loader import load_checkpoint

    _check_output(out, force, directory=False)
    state_dict = load_checkpoint(checkpoint, keys=keys, trust=trust)
    fd, tmp = tempfile.mkstemp(prefix=".dcplan-convert-", suffix=".pt", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return state_dict


def _safe_torch_load(path: str, trust: bool) -> Any:
    import torch

    from dcplan import compat
    from dcplan.config import resolve_config
    from dcplan.load.safe import UnsafeCheckpointError, _blocked_from, _weights_only_globals, collect_safe_globals
    from dcplan.manager import get_plugin_manager

    if not os.path.exists(path):
        raise DcplanError(f"cannot read {path}: no such file")
    if os.path.isdir(path):
        raise DcplanError(f"{path} is a directory; --to-dcp reads a torch.save file (IN.pt)")
    if trust:
        return torch.load(path, weights_only=False, map_location="cpu")
    config, _ = resolve_config()
    pairs = collect_safe_globals(config, get_plugin_manager())
    with open(path, "rb") as fh:
        try:
            return compat.weights_only_load(fh, _weights_only_globals(pairs))
        except pickle.UnpicklingError as exc:
            blocked = _blocked_from(fh, exc, {n for _, n in pairs})
            if blocked or "GLOBAL" in str(exc):
                raise UnsafeCheckpointError(os.path.basename(path), blocked) from None
            raise


def torch_save_to_dcp(source: str, checkpoint: str, *, trust: bool = False, force: bool = False) -> dict[str, Any]:
    """Convert a ``torch.save`` file holding a state dict to a DCP checkpoint. Returns the state dict."""
    import torch.distributed.checkpoint as dcp

    from dcplan import compat

    _check_output(checkpoint, force, directory=True)
    state_dict = _safe_torch_load(source, trust)
    if not isinstance(state_dict, dict):
        raise DcplanError(f"{source} holds a {type(state_dict).__name__}, not a state dict (a dict); nothing written")
    os.makedirs(checkpoint, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        warnings.filterwarnings("ignore", message=".*existing checkpoint.*")  # --force was given
        dcp.save(
            state_dict,
            storage_writer=dcp.FileSystemWriter(checkpoint),
            planner=compat.torch_default_save_planner(),
        )
    return state_dict



_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` (10**9, as the Hub counts), ``"500MiB"``, ``"2e9"`` or an int: a byte count >= 1."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else "?"
        if m is None or unit not in _UNITS:
            raise DcplanError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise DcplanError(f"--max-shard-size must be at least 1 byte, got {text!r}")
    return value


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    """Nested dicts and lists to dotted keys, as DCP flattens them (``model.layers.0.weight``)."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj and prefix:
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = obj


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _shards(tensors: dict[str, Any], max_bytes: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return [s for s in shards if s]


def dcp_to_safetensors(
    checkpoint: str,
    out_dir: str,
    keys: list[str] | None = None,
    *,
    max_shard_size: str | int = "5GB",
    trust: bool = False,
    force: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Export a DCP checkpoint's tensors to Hugging Face safetensors shards in ``out_dir``.

    Files: ``model.safetensors`` (one shard) or ``model-00001-of-0000N.safetensors``, and
    always ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...},
    "weight_map": {key: file}}``). Tensors keep their dtype. Non-tensor values that JSON can
    hold (numbers, strings, lists, dicts) go into the index's ``metadata`` under
    ``"dcplan_objects"``; the others are skipped and returned in ``"skipped"``.

    :param progress: ``progress(iterable, desc, total=...)``, e.g. :func:`dcplan.cli.progress.progress`.
    :returns: ``{"files": [...], "tensors": n, "total_size": bytes, "objects": [...], "skipped": [...]}``.
    """
    import torch
    from safetensors.torch import save_file

    from dcplan_empty_load.loader import load_checkpoint

    max_bytes = parse_size(max_shard_size)
    _check_output(out_dir, force, directory=True)
    flat: dict[str, Any] = {}
    _flatten(load_checkpoint(checkpoint, keys=keys, trust=trust), "", flat)
    tensors = {k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    objects = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor) and _json_value(v)}
    skipped = sorted(k for k in flat if k not in tensors and k not in objects)
    if not tensors:
        raise DcplanError(f"{checkpoint} holds no tensors{' under the selected keys' if keys else ''}; nothing written")
    shards = _shards(tensors, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    os.makedirs(out_dir, exist_ok=True)
    steps = zip(names, shards)
    for name, shard in (progress(steps, "writing shards", total=len(shards)) if progress else steps):
        save_file({k: tensors[k] for k in shard}, os.path.join(out_dir, name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    meta: dict[str, Any] = {"total_size": total}
    if objects:
        meta["dcplan_objects"] = objects
    if skipped:
        meta["dcplan_skipped"] = skipped
    index = {"metadata": meta, "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return {"files": names, "tensors": len(tensors), "total_size": total, "objects": sorted(objects),
            "skipped": skipped}
