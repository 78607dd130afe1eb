"""bench/bench.py reporting: rows, the baseline ratio and the step profile from fake measurements (no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("vd_bench", Path(__file__).resolve().parents[1] / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

STEPS = 4


def _invert(stage: str, wall: float, loop: float, fwd: int, gt: int, bwd: int, mse: float) -> dict:
    return {"stage": stage, "wall_s": wall, "load_s": 2.0, "peak_gib": 1.5, "disk_mib": 3.0,
            "result": {"counts": {"this_run": {"unet_forwards": fwd, "unet_gt_forwards": gt, "backwards": bwd}},
                       "timings": {"null_text_s": loop}, "recon": {"psnr": 30.0, "latent_mse": mse}}}


def _steps(**phases: float) -> list[dict[str, float]]:
    return [{"step": float(i), "total": sum(phases.values()) + 0.5, **phases} for i in range(STEPS)]


@pytest.fixture
def measured() -> list[dict]:
    edit = {"stage": "edit", "wall_s": 5.0, "load_s": 2.0, "peak_gib": 1.0, "disk_mib": 0.5,
            "result": {"unet_calls": STEPS, "unet_batch": 4, "timings": {"edit": 4.0}}}
    return [_invert("invert", 10.0, 8.0, 30, 2, 20, 0.125), edit, _invert("baseline", 40.0, 36.0, 60, 16, 36, 0.125)]


def test_rows_count_batch_entries_and_use_the_stepping_loop_per_step(measured):
    rows = [bench.summarise(m, STEPS) for m in measured]
    inv, edit, base = rows
    assert (inv["unet_fwd"], inv["unet_bwd"], inv["per_step_s"]) == (32, 20, 2.0)
    assert (edit["unet_fwd"], edit["unet_bwd"], edit["per_step_s"]) == (16, 0, 1.0)  # 4 calls x batch 4
    assert base["unet_fwd"] == 76 and "latent MSE 1.2500e-01" in base["quality"]


def test_profile_summary_averages_the_middle_steps_and_keeps_the_rest_as_other():
    steps = _steps(inner_forward=1.0, inner_backward=2.0)
    steps[0]["inner_forward"] = 100.0  # first and last steps (no STDG) are left out
    prof = bench.profile_summary(steps)
    assert prof["inner_forward"] == pytest.approx(1.0) and prof["inner_backward"] == pytest.approx(2.0)
    assert prof["total"] == pytest.approx(3.5) and prof["other"] == pytest.approx(0.5) and prof["gc"] == 0.0


def test_report_has_the_table_the_ratio_the_difference_and_the_profile(measured):
    rows = [bench.summarise(m, STEPS) for m in measured]
    profiles = {"invert": bench.profile_summary(_steps(inner_forward=1.0, inner_backward=1.0)),
                "baseline": bench.profile_summary(_steps(inner_forward=2.0, inner_backward=3.0, gc=2.0))}
    meta = {"when": "2026-01-01 00:00 UTC", "device": "CPU test", "commit": "abc1234", "settings": "size tiny"}
    diff = {"recon_latents": 1e-4, "recon_latents_rel": 1e-5, "null_embeddings": 2e-4, "null_embeddings_rel": 3e-5}
    text = bench.format_report(meta, rows, profiles, diff)
    lines = text.splitlines()
    assert lines[0] == "### 2026-01-01 00:00 UTC | CPU test | commit abc1234 | size tiny"
    table = [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip() in ("invert", "edit", "baseline")]
    assert [ln.split("|")[1].strip() for ln in table] == ["invert", "edit", "baseline"]
    assert all(ln.count("|") == 10 for ln in table) and "None" not in text
    assert "4.00x stage wall time (4.50x the null-text loop)" in text
    assert "Per middle step 3.00x, 2.20x without the baseline's gc.collect (27% of its step)" in text
    assert "recon latents 1.00e-04" in text
    profile = [ln for ln in lines if ln.startswith("| gc |") or ln.startswith("| total |")]
    assert profile[0] == "| gc | 0.000 | 0 | 2.000 | 27 |"
    assert profile[1].startswith("| total | 2.500 | 100 | 7.500 | 100")
    assert "| commit |" not in text  # phases absent from every column are left out


def test_report_without_baseline_or_profile_is_just_the_table(measured):
    rows = [bench.summarise(m, STEPS) for m in measured[:2]]
    text = bench.format_report({"when": "w", "device": "d", "commit": "c", "settings": "s"}, rows)
    assert "Baseline" not in text and "Profile" not in text and len(text.splitlines()) == 6
