"""Run the installed ``dcplan`` script in a subprocess, with no DCPLAN_* variable leaking in from the caller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCPLAN_")}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "dcplan"), *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True)
