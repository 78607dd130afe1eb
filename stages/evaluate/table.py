"""`vd eval --compare`: evaluate many workspaces and average each metric over clips (the paper's Table 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from stages.common.errors import InputError
from stages.common.jsonsafe import json_safe
from stages.common.progress import Progress
from stages.evaluate.config import RECON, EvalConfig, as_number, clip_mean, parse_metrics
from stages.evaluate.inputs import has_results
from stages.evaluate.run import run_eval
from stages.evaluate.scorers import Scorers
from stages.io.workspace import Workspace


def find_workspaces(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a workspace, or a folder whose direct subfolders include workspaces."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "zarr.json").is_file():
            found.append(path)
        elif path.is_dir():
            subs = sorted(p for p in path.iterdir() if (p / "zarr.json").is_file())
            if not subs:
                raise InputError(f"{path} is neither a vd workspace nor a folder of workspaces")
            found.extend(subs)
        else:
            raise InputError(f"workspace {path} not found")
    if not found:
        raise InputError("no workspaces given")
    return list(dict.fromkeys(found))


def compare(paths: Iterable[str | Path], config: EvalConfig, progress: Progress | None = None,
            force: bool = False) -> dict[str, Any]:
    """Evaluate (or reuse stored results of) many workspaces and average each metric over clips.

    Groups: "reconstruction", "all edits" (every edit of every clip), and one per edit name.
    """
    progress = progress or Progress(quiet=True)
    scorers = Scorers(config)
    workspaces = find_workspaces(paths)
    per_clip: dict[str, dict[str, Any]] = {}
    metrics: list[str] = parse_metrics(config.metrics)
    skipped: dict[str, str] = {}
    for path in workspaces:
        if not has_results(Workspace.open(path)):
            # a clip not inverted yet must not sink a batch table; it is listed instead
            skipped[str(path)] = "no inversion/reconstruction and no finished edit yet"
            progress.log(f"skipping {path}: nothing to evaluate yet (run `vd invert` and `vd edit`)")
            continue
        res = run_eval(path, config, progress, scorers, reuse=not force)
        per_clip[str(path)] = {name: item["metrics"] for name, item in res["items"].items()}
    if not per_clip:
        raise InputError(f"nothing to evaluate in {len(workspaces)} workspace(s): none has an inversion or a "
                         "finished edit; run `vd invert` and `vd edit` first")
    result = {"clips": list(per_clip), "metrics": metrics, "groups": compare_groups(per_clip),
              "per_clip": per_clip}
    from stages.evaluate.methods import inversion_facts, split_by_method

    facts = {c: inversion_facts(Workspace.open(c)) for c in per_clip}  # by `vd invert --method`, side by side
    result["methods"] = {m: {"clips": clips, "groups": compare_groups({c: per_clip[c] for c in clips}),
                             "inversion": aggregate([{k: v for k, v in facts[c].items() if k != "method"}
                                                     for c in clips])}
                         for m, clips in split_by_method(facts).items()}
    if skipped:
        result["skipped_clips"] = skipped
    return result


def compare_groups(per_clip: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The comparison table over clips ({clip: {name: metrics}}): the reconstruction, all edits together,
    then each edit name, each aggregated over the clips that have it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for clip_items in per_clip.values():
        for name, values in clip_items.items():
            if name != RECON:
                groups.setdefault("all edits", []).append(values)
            groups.setdefault(name, []).append(values)
    fixed = [g for g in (RECON, "all edits") if g in groups]
    order = fixed + sorted(g for g in groups if g not in fixed)
    return {g: aggregate(groups[g]) for g in order}


def aggregate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over `items` ({metric: value} each), with how many items had a number."""
    keys = list(dict.fromkeys(k for item in items for k in item))
    means: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key in keys:
        vals = [as_number(item.get(key)) for item in items]
        nums = [v for v in vals if v is not None]
        if nums:
            means[key], counts[key] = clip_mean(nums), len(nums)
        else:
            first = next((item[key] for item in items if isinstance(item.get(key), dict)), None)
            means[key], counts[key] = first if first is not None else float("nan"), 0
    return json_safe({"n": len(items), "metrics": means, "counts": counts})
