"""Make throwaway distributions with ``dcplan`` entry points on a sys.path entry."""

from __future__ import annotations

from pathlib import Path


def make_dist(site: Path, dist: str, module: str, source: str, ep_name: str | None = None, version: str = "1.0") -> None:
    """Write ``module.py`` and a ``dist-version.dist-info`` with one ``dcplan`` entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[dcplan]\n{ep_name or module} = {module}\n")
    (info / "RECORD").write_text("")


STRATEGY_SRC = '''
import dcplan

def _dedup(all_plans):
    from dcplan_lowest_rank import lowest_rank
    return lowest_rank(all_plans)

@dcplan.hookimpl
def dcplan_register_strategies():
    return [dcplan.Strategy(name={name!r}, func=_dedup, description="test strategy {name}")]
'''
