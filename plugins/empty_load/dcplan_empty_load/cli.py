"""The ``dcplan convert`` command, added through the ``dcplan_register_commands`` hook.

This module is the plugin's ``dcplan.cli`` entry point. It imports neither torch nor
the loader: those are imported when the command runs, so ``dcplan --help`` stays fast.
"""

from __future__ import annotations

import argparse
import pickle
from typing import Any

import dcplan
from dcplan.errors import DcplanError

__all__ = ["dcplan_register_commands"]

DESCRIPTION = """\
Convert a DCP checkpoint to a torch.save file or to Hugging Face safetensors, or a
torch.save file to a DCP checkpoint:

  dcplan convert CKPT OUT.pt [--keys K ...]
  dcplan convert CKPT OUT_DIR --to safetensors [--max-shard-size 5GB] [--keys K ...]
  dcplan convert --to-dcp IN.pt CKPT

--to safetensors writes model.safetensors (or model-00001-of-0000N.safetensors
shards of at most --max-shard-size) and model.safetensors.index.json, as the Hub
expects. Tensors keep their dtype; non-tensor values that JSON can hold go into the
index's metadata ("dcplan_objects"), the others are listed as skipped.

Everything is read safely by default (allow-list .metadata, weights-only objects);
--trust switches to full pickle (DANGEROUS). An existing output is only replaced
with --force.
"""


def _report_safetensors(args: argparse.Namespace) -> None:
    from dcplan.cli.progress import progress
    from dcplan_empty_load.convert import dcp_to_safetensors

    out = dcp_to_safetensors(args.source, args.dest, args.keys, max_shard_size=args.max_shard_size,
                             trust=args.trust, force=args.force, progress=progress)
    print(f"wrote {len(out['files'])} safetensors file(s) and model.safetensors.index.json to {args.dest}: "
          f"{out['tensors']} tensor(s), {out['total_size']:,} bytes, from DCP checkpoint {args.source}")
    if out["objects"]:
        print(f"non-tensor values in the index metadata (dcplan_objects): {', '.join(out['objects'])}")
    if out["skipped"]:
        print(f"skipped (not tensors, not JSON): {', '.join(out['skipped'])}")


def _convert(args: argparse.Namespace) -> None:
    from dcplan_empty_load.convert import dcp_to_torch_save, torch_save_to_dcp

    if args.to_dcp:
        if args.keys:
            raise DcplanError("--keys selects keys of a DCP checkpoint; it cannot be used with --to-dcp")
        if args.to != "torch":
            raise DcplanError("--to-dcp reads a torch.save file; it cannot be used with --to")
        sd = torch_save_to_dcp(args.source, args.dest, trust=args.trust, force=args.force)
        print(f"wrote DCP checkpoint {args.dest} ({len(sd)} top-level key(s)) from {args.source}")
    elif args.to == "safetensors":
        _report_safetensors(args)
    else:
        sd = dcp_to_torch_save(args.source, args.dest, args.keys, trust=args.trust, force=args.force)
        print(f"wrote {args.dest} ({len(sd)} top-level key(s)) from DCP checkpoint {args.source}")


def _cmd_convert(args: argparse.Namespace) -> int:
    from dcplan.load.safe import CheckpointReadError

    try:
        _convert(args)
    except DcplanError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointReadError(f"convert failed: {type(exc).__name__}: {msg}") from None
    return 0


@dcplan.hookimpl
def dcplan_register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a DCP checkpoint to a torch.save file or safetensors (or back with --to-dcp)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="the DCP checkpoint directory (IN.pt with --to-dcp)")
    p.add_argument("dest", help="the torch.save file, or the safetensors directory, to write "
                                "(the checkpoint directory with --to-dcp)")
    p.add_argument("--to", choices=("torch", "safetensors"), default="torch",
                   help="output format of a DCP checkpoint (default: torch)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="with --to safetensors: the largest shard, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--to-dcp", action="store_true", help="convert a torch.save file into a DCP checkpoint")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="only these flattened keys or nested prefixes (e.g. model)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--trust", action="store_true",
                   help="unpickle with full pickle (DANGEROUS: a crafted checkpoint can run code)")
    p.set_defaults(func=_cmd_convert)
