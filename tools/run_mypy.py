"""Run mypy on the core package and every ``plugins/*/`` package (found by glob).

Used by ``tox -e type``; extra arguments are passed to mypy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def targets(root: Path = ROOT) -> list[str]:
    """``core/dcplan`` plus each plugin's top-level package folders."""
    out = [str(root / "core" / "dcplan")]
    for project in sorted(p.parent for p in (root / "plugins").glob("*/pyproject.toml")):
        out += [str(pkg.parent) for pkg in sorted(project.glob("*/__init__.py"))]
    return out


def main(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *argv, *targets()]
    print("run_mypy:", " ".join(str(Path(t).relative_to(ROOT)) for t in targets()), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
