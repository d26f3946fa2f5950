"""``dcplan convert``: DCP checkpoint <-> ``torch.save`` file.

* ``dcplan convert CKPT OUT.pt [--keys K ...]``: load a DCP checkpoint (or the selected
  keys / nested prefixes) with the empty loader (``dcplan-empty-load``) and ``torch.save`` it.
* ``dcplan convert --to-dcp IN.pt CKPT``: ``torch.load`` a state dict and write it as a DCP
  checkpoint in this process.

Both read safely by default (allow-list ``.metadata``, weights-only objects); ``--trust``
switches to full pickle (DANGEROUS). An existing output is only replaced with ``--force``.
The empty loader is imported when the command runs, never when the CLI is built.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import warnings
from typing import Any

from dcplan.errors import DcplanError

__all__ = ["register", "dcp_to_torch_save", "torch_save_to_dcp"]


def _empty_loader() -> Any:
    try:
        import dcplan_empty_load
    except ModuleNotFoundError as exc:
        if exc.name != "dcplan_empty_load":
            raise
        raise DcplanError(
            "dcplan convert needs the empty-state-dict loader: pip install dcplan-empty-load"
        ) from None
    return dcplan_empty_load


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

    empty = _empty_loader()
    _check_output(out, force, directory=False)
    state_dict = empty.load_checkpoint(checkpoint, keys=keys, trust=trust)
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


def _cmd_convert(args: argparse.Namespace) -> int:
    from dcplan.load.safe import CheckpointReadError

    try:
        if args.to_dcp:
            if args.keys:
                raise DcplanError("--keys selects keys of a DCP checkpoint; it cannot be used with --to-dcp")
            sd = torch_save_to_dcp(args.source, args.dest, trust=args.trust, force=args.force)
            print(f"wrote DCP checkpoint {args.dest} ({len(sd)} top-level key(s)) from {args.source}")
        else:
            sd = dcp_to_torch_save(args.source, args.dest, args.keys, trust=args.trust, force=args.force)
            print(f"wrote {args.dest} ({len(sd)} top-level key(s)) from DCP checkpoint {args.source}")
    except DcplanError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointReadError(f"convert failed: {type(exc).__name__}: {msg}") from None
    return 0


def register(subparsers: Any) -> None:
    """Add ``dcplan convert`` to the CLI."""
    p = subparsers.add_parser(
        "convert",
        help="convert a DCP checkpoint to a torch.save file (or back with --to-dcp)",
        description="dcplan convert CKPT OUT.pt [--keys K ...]  |  dcplan convert --to-dcp IN.pt CKPT",
    )
    p.add_argument("source", help="the DCP checkpoint directory (IN.pt with --to-dcp)")
    p.add_argument("dest", help="the torch.save file to write (the checkpoint directory with --to-dcp)")
    p.add_argument("--to-dcp", action="store_true", help="convert a torch.save file into a DCP checkpoint")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="only these flattened keys or nested prefixes (e.g. model)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--trust", action="store_true",
                   help="unpickle with full pickle (DANGEROUS: a crafted checkpoint can run code)")
    p.set_defaults(func=_cmd_convert)
