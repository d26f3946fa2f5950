"""Install every local plugin package (``plugins/*/``) into the running interpreter.

Used by tox (``commands_pre``) so that each environment gets the plugins the way a
user gets them: built as wheels and installed non-editable. New plugin folders are
found by glob and need no ``tox.ini`` edit.

    python tools/install_local.py                    # plugins/*/
    python tools/install_local.py --tests            # plugins/*/ and test-only tests/plugins/*/
    python tools/install_local.py --extra examples/dcplan-node-local

``--tests`` adds the test-only plugins under ``tests/plugins/*/`` (e.g.
``dcplan-adversarial``, deliberately broken strategies the suite proves the core
refuses). Only tox's test environments pass it: ``tox -e demo`` and a plain
``pip install`` of dcplan never see them.

Each project is copied to a temporary folder first (without ``build/`` and
``*.egg-info``): stale build output in a working tree never leaks into a wheel, and
parallel tox environments never build in the same folder at once.

``dcplan`` itself is installed by tox (its package build of the root
``pyproject.toml``) before this runs; the plugins are installed with
``--no-deps`` so pip never replaces it (or torch) with something from an index,
and ``pip check`` then proves their declared dependencies are satisfied.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plugin_dirs(root: Path = ROOT) -> list[Path]:
    """Every ``plugins/<name>/`` holding a ``pyproject.toml``, sorted by name."""
    return sorted(p.parent for p in (root / "plugins").glob("*/pyproject.toml"))


def test_plugin_dirs(root: Path = ROOT) -> list[Path]:
    """Every test-only ``tests/plugins/<name>/`` holding a ``pyproject.toml``, sorted by name."""
    return sorted(p.parent for p in (root / "tests" / "plugins").glob("*/pyproject.toml"))


test_plugin_dirs.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def third_party_requirements(dirs: list[Path]) -> list[str]:
    """The dependencies the projects in ``dirs`` declare, less dcplan's own distributions and torch.

    The projects themselves are installed ``--no-deps`` (so pip never swaps dcplan or torch
    for something from an index); what else they need (e.g. ``safetensors`` for
    ``dcplan-empty-load``) is installed from these requirement strings, with dependencies.
    """
    import re
    import tomllib

    out: list[str] = []
    for d in dirs:
        deps = tomllib.loads((d / "pyproject.toml").read_text())["project"].get("dependencies", [])
        for req in deps:
            name = re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0].lower().replace("_", "-")
            if name != "torch" and not name.startswith("dcplan") and req not in out:
                out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--extra", action="append", default=[], metavar="DIR",
        help="another project folder to install the same way (must exist)",
    )
    parser.add_argument(
        "--tests", action="store_true",
        help="also install the test-only plugins under tests/plugins/*/ (test environments only)",
    )
    args = parser.parse_args(argv)
    dirs = plugin_dirs()
    if not dirs:
        print(f"install_local: no plugins/*/pyproject.toml under {ROOT}", file=sys.stderr)
        return 1
    for extra in args.extra:
        path = (ROOT / extra).resolve()
        if not (path / "pyproject.toml").is_file():
            print(
                f"install_local: {extra} has no pyproject.toml ({path}); this environment needs that project. "
                "Check out a tree that contains it, or run another tox environment.",
                file=sys.stderr,
            )
            return 1
        dirs.append(path)
    if args.tests:
        dirs.extend(test_plugin_dirs())
    print("install_local:", " ".join(str(d.relative_to(ROOT)) for d in dirs), flush=True)
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".tox", ".pytest_cache")
    with tempfile.TemporaryDirectory(prefix="dcplan-install-") as tmp:
        copies = []
        for d in dirs:
            dst = Path(tmp) / d.name
            shutil.copytree(d, dst, ignore=ignore)
            copies.append(str(dst))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--quiet", *copies]
        rc = subprocess.call(cmd)
    if rc:
        return rc
    reqs = third_party_requirements(dirs)
    if reqs:
        print("install_local: their requirements:", " ".join(reqs), flush=True)
        rc = subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *reqs])
        if rc:
            return rc
    return subprocess.call([sys.executable, "-m", "pip", "check"])


if __name__ == "__main__":
    sys.exit(main())
