"""The dcplan CLI, and plugins appearing/disappearing with pip install/uninstall."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _cli import cli_env as _env
from _cli import run_cli as _run


def test_plugins_json(tmp_path):
    proc = _run("plugins", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    by_dist = {p["distribution"]: p for p in data["plugins"]}
    assert by_dist["dcplan"]["builtin"] and "dcplan_create_local_save_plan" in by_dist["dcplan"]["hooks"]
    assert by_dist["dcplan-lowest-rank"]["strategies"] == ["lowest_rank"]
    assert by_dist["dcplan-lowest-rank"]["version"]
    assert by_dist["dcplan-size-balanced"]["hooks"] == ["dcplan_register_strategies"]
    assert data["strategies"]["size_balanced"]["distribution"] == "dcplan-size-balanced"


def test_plugins_text_and_disable(tmp_path):
    proc = _run("plugins", cwd=tmp_path, DCPLAN_DISABLE_PLUGINS="dcplan-lowest-rank")
    assert proc.returncode == 0
    assert "dcplan-size-balanced" in proc.stdout and "strategy: size_balanced" in proc.stdout
    assert "strategy: lowest_rank" not in proc.stdout
    # a disabled plugin is listed as disabled, with the variable that disabled it (issue 18)
    assert "DISABLED dcplan-lowest-rank 0.1.0 (lowest_rank): disabled by DCPLAN_DISABLE_PLUGINS" in proc.stdout


def _wheel(tmp_path: Path, dist: str, module: str, strategy: str) -> Path:
    """A minimal, valid wheel with one dcplan entry point (built by hand: no build backend needed)."""
    norm = dist.replace("-", "_")
    info = f"{norm}-1.0.dist-info"
    files = {
        f"{module}.py": (
            "import dcplan\n"
            "def _dedup(all_plans):\n"
            "    from dcplan_lowest_rank import lowest_rank\n"
            "    return lowest_rank(all_plans)\n"
            "@dcplan.hookimpl\n"
            "def dcplan_register_strategies():\n"
            f"    return [dcplan.Strategy(name={strategy!r}, func=_dedup, description='from a throwaway wheel')]\n"
        ),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: dcplan-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[dcplan]\n{strategy} = {module}\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = tmp_path / f"{norm}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, text=True,
                   env=_env(PIP_NO_INDEX="1"))


def _select(tmp_path: Path, strategy: str) -> subprocess.CompletedProcess[str]:
    code = f"import dcplan; print(dcplan.SavePlanner(strategy={strategy!r}).strategy.description)"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)


def test_pip_install_then_uninstall_plugin(tmp_path):
    dist, module, strategy = "dcplan-throwaway", "dcplan_throwaway", "throwaway"
    wheel = _wheel(tmp_path, dist, module, strategy)
    _pip("install", "--no-deps", str(wheel))
    try:
        data = json.loads(_run("plugins", "--json", cwd=tmp_path).stdout)
        assert data["strategies"][strategy]["distribution"] == dist
        proc = _select(tmp_path, strategy)
        assert proc.returncode == 0 and "throwaway wheel" in proc.stdout
    finally:
        _pip("uninstall", "-y", dist)
    data = json.loads(_run("plugins", "--json", cwd=tmp_path).stdout)
    assert strategy not in data["strategies"]
    assert dist not in {p["distribution"] for p in data["plugins"]}
    proc = _select(tmp_path, strategy)
    assert proc.returncode != 0
    assert "unknown dcplan strategy 'throwaway'; choose one of: " in proc.stderr
    assert "lowest_rank" in proc.stderr


def test_broken_plugin_named_in_cli(tmp_path):
    site = tmp_path / "site"
    sys.path.insert(0, str(Path(__file__).parent))
    from _fakedist import make_dist

    make_dist(site, "fake-broken", "fake_broken", "raise RuntimeError('needs cuda')\n")
    env = {"PYTHONPATH": str(site)}
    proc = _run("plugins", cwd=tmp_path, **env)
    assert proc.returncode == 0
    assert "FAILED fake-broken" in proc.stdout and "needs cuda" in proc.stdout
    proc = _run("plugins", cwd=tmp_path, DCPLAN_STRICT_PLUGINS="1", **env)
    assert proc.returncode == 2
    assert "failed to load" in proc.stderr and "DCPLAN_STRICT_PLUGINS" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_demo_runs_and_verifies(tmp_path):
    proc = _run("demo", "--world-size", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit-exact" in proc.stdout and "OK: every checkpoint reloaded bit-exact" in proc.stdout
    assert "torch-default" in proc.stdout


def test_demo_unknown_strategy_fails_fast(tmp_path):
    proc = _run("demo", "--strategy", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "choose one of" in proc.stderr and "Traceback" not in proc.stderr
