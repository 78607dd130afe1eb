"""Stage `vd eval`: score a workspace's reconstruction and edits, or compare many workspaces.

config (settings, metric names, value conventions) -> scorers (optional model metrics) -> inputs (what a
workspace holds) -> run (one workspace) -> table (many workspaces) ; plots (per-frame charts).
"""

from stages.evaluate.config import (GROUPS, METRICS, OCCLUSION, RECON, EvalConfig, as_number, clip_mean, metric_of,
                                    parse_metrics, unavailable)
from stages.evaluate.fresh import is_current
from stages.evaluate.plots import line_chart, write_plots
from stages.evaluate.run import run_eval, seam_metrics
from stages.evaluate.scorers import HOW, Scorers
from stages.evaluate.table import aggregate, compare, compare_groups, find_workspaces

__all__ = [
    "GROUPS", "HOW", "METRICS", "OCCLUSION", "RECON", "EvalConfig", "Scorers", "aggregate", "as_number",
    "clip_mean", "compare", "compare_groups", "find_workspaces", "is_current", "line_chart",
    "metric_of", "parse_metrics", "run_eval", "seam_metrics", "unavailable", "write_plots",
]
