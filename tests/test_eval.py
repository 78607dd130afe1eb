"""`vd eval` end to end on workspaces built directly (no model runs), plus run_eval/compare details."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_workspace
from stages.common.jsonsafe import json_safe
from stages.evaluate import EvalConfig, as_number, metric_of, parse_metrics, run_eval
from stages.common.errors import InputError, UsageError
from vdcli.app import app


@pytest.fixture(autouse=True)
def _no_user_weights(monkeypatch, tmp_path):
    """Tests must not pick up weights configured on the machine running them."""
    for var in ("VD_LPIPS", "VD_CLIP", "VD_PICKSCORE", "VD_PICKSCORE_PROCESSOR", "VD_AMT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def invoke(args: list[str]):
    """Run `vd ARGS`. While eval is the only command in a checkout, Typer would collapse the app into
    that command, so fall back to the explicit group then."""
    runner = CliRunner()
    if len(app.registered_commands) > 1:
        return runner.invoke(app, args)
    from click.testing import CliRunner as ClickRunner
    from typer.main import get_group

    return ClickRunner.invoke(runner, get_group(app), args)


def build(path: Path, seed: int = 0, recon: bool = True, edits: bool = True):
    """Workspace with a noisy reconstruction, a foreground edit (only inside the mask changed) and a
    background edit (only outside the object changed)."""
    ws = make_workspace(path, frames=4, size=64, seed=seed)
    src = ws.read("video/frames")
    mask = ws.read("masks/edit").astype(bool)
    if recon:
        noise = np.random.default_rng(seed).normal(0, 4, src.shape)
        ws.write_array("inversion/reconstruction", np.clip(src + noise, 0, 255).astype(np.uint8))
    if edits:
        fg = src.copy()
        fg[mask] = (40, 200, 60)
        ws.write_array("edits/tiger/frames", fg)
        ws.update_attrs("edits/tiger", prompt="a green disc", params={"background": False}, status="done")
        bg = src.copy()
        bg[~mask] = 255 - bg[~mask]
        ws.write_array("edits/night/frames", bg)
        ws.update_attrs("edits/night", prompt="a disc at night", params={"background": True}, status="done")
    return ws


def test_cli_end_to_end_json_table_storage_and_plots(tmp_path):
    ws = build(tmp_path / "ws")
    res = invoke(["eval", str(ws.path), "--json", "-q", "--plot"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    items = out["items"]
    assert list(items) == ["reconstruction", "night", "tiger"]
    rec = items["reconstruction"]["metrics"]
    assert 30 < rec["psnr"] < 40 and 0 < rec["ssim_outside"] < 1
    assert rec["lpips"] == {"available": False, "reason": rec["lpips"]["reason"], "how": rec["lpips"]["how"]}
    assert "--lpips" in rec["lpips"]["how"]
    # both edits leave their unedited region untouched: PSNR inf, serialised as the string "inf"
    for name in ("tiger", "night"):
        m = items[name]["metrics"]
        assert m["psnr_unedited"] == "inf" and as_number(m["psnr_unedited"]) == math.inf
        assert m["warp_error"] >= 0 and m["warp_error_source"] >= 0
        assert 0 < m["smoothness"] <= 1
        for key in ("clip_score", "pickscore", "vbench_smoothness"):
            assert m[key]["available"] is False and m[key]["how"]
    assert items["night"]["background"] is True and "object" in items["night"]["region"]
    assert len(items["tiger"]["per_frame"]["warp_error"]) == 3
    # stored in the workspace: eval/<name> attrs metrics, per_frame, settings
    stored = ws.group_attrs("eval/tiger")
    assert stored["metrics"]["psnr_unedited"] == "inf"
    assert len(stored["per_frame"]["psnr_unedited"]) == 4 and stored["settings"]["metrics"]
    assert ws.group_attrs("eval/reconstruction")["metrics"]["psnr"] == pytest.approx(rec["psnr"])
    from PIL import Image

    assert out["plots"] and all((ws.path / p).is_file() for p in out["plots"])
    assert Image.open(ws.path / "eval/plots/warp_error.png").size == (720, 400)
    # the human table
    table = invoke(["eval", str(ws.path), "-q", "--metrics", "fidelity"])
    assert table.exit_code == 0, table.output
    assert "Reconstruction" in table.stdout and "tiger" in table.stdout and "n/a" in table.stdout


def test_background_edit_measures_the_object_not_the_background(tmp_path):
    ws = build(tmp_path / "ws")
    cfg = EvalConfig(edits=["night"], metrics=["psnr"], store=False)
    assert run_eval(ws, cfg)["items"]["night"]["metrics"]["psnr_unedited"] == "inf"
    ws.update_attrs("edits/night", params={"background": False})  # now its changes count
    assert as_number(run_eval(ws, cfg)["items"]["night"]["metrics"]["psnr_unedited"]) < 20


@pytest.mark.parametrize("args, code, text", [
    (["eval", "MISSING"], 3, "not found"),
    (["eval", "WS", "--edit", "lion"], 3, "available: reconstruction, night, tiger"),
    (["eval", "WS", "--metrics", "psnr,bogus"], 2, "unknown metric 'bogus'"),
    (["eval", "WS", "--all", "--edit", "tiger"], 2, "contradict"),
    (["eval", "WS", "WS"], 2, "--compare"),
])
def test_cli_errors_are_one_line_with_exit_codes(tmp_path, args, code, text):
    ws = build(tmp_path / "ws")
    args = [str(tmp_path / "nope") if a == "MISSING" else str(ws.path) if a == "WS" else a for a in args]
    res = invoke(args)
    assert res.exit_code == code, res.output
    assert text in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.output


def test_nothing_to_evaluate_says_run_invert_or_edit(tmp_path):
    ws = build(tmp_path / "ws", recon=False, edits=False)
    res = invoke(["eval", str(ws.path)])
    assert res.exit_code == 3 and "vd invert" in res.stderr and "vd edit" in res.stderr


def test_unfinished_edits_are_skipped_unless_asked_for(tmp_path):
    ws = build(tmp_path / "ws")
    ws.update_attrs("edits/night", status="running")
    out = run_eval(ws, EvalConfig(metrics=["psnr"]))
    assert "night" not in out["items"] and "running" in out["skipped"]["night"]
    with pytest.raises(InputError, match="not finished"):
        run_eval(ws, EvalConfig(edits=["night"]))


def test_compare_averages_over_clips_and_reuses_fresh_results(tmp_path):
    a = build(tmp_path / "clips" / "a", seed=0)
    b = build(tmp_path / "clips" / "b", seed=1)
    cfg = EvalConfig(metrics=["psnr", "smoothness"])
    single = [run_eval(ws, cfg)["items"] for ws in (a, b)]
    res = invoke(["eval", "--compare", str(tmp_path / "clips"), "--metrics", "psnr,smoothness", "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["clips"]) == 2 and list(out["groups"])[:2] == ["reconstruction", "all edits"]
    want = np.mean([s["reconstruction"]["metrics"]["psnr"] for s in single])
    assert out["groups"]["reconstruction"]["metrics"]["psnr"] == pytest.approx(want)
    edits = [s[n]["metrics"]["smoothness"] for s in single for n in ("tiger", "night")]
    assert out["groups"]["all edits"]["n"] == 4
    assert out["groups"]["all edits"]["metrics"]["smoothness"] == pytest.approx(np.mean(edits))
    assert out["groups"]["tiger"]["metrics"]["psnr_unedited"] == "inf"
    # stored results are reused until the edit changes
    again = run_eval(a, cfg, reuse=True)["items"]
    assert again["tiger"].get("reused") is True
    assert {metric_of(k) for k in again["tiger"]["metrics"]} == {"psnr", "smoothness"}
    only_psnr = run_eval(a, EvalConfig(metrics=["psnr"]), reuse=True)["items"]["tiger"]
    assert only_psnr["reused"] and {metric_of(k) for k in only_psnr["metrics"]} == {"psnr"}
    a.write_array("edits/tiger/frames", a.read("video/frames"))
    assert "reused" not in run_eval(a, cfg, reuse=True)["items"]["tiger"]
    table = invoke(["eval", "--compare", str(a.path), str(b.path), "-q"])
    assert table.exit_code == 0 and "all edits n=4" in table.stdout


def test_optional_weights_make_metrics_available(tmp_path):
    """LPIPS from a local weights file and CLIP/PickScore from a local HF folder (tiny random models)."""
    from safetensors.torch import save_file

    from test_metrics import random_lpips_state

    ws = build(tmp_path / "ws")
    save_file(random_lpips_state(), str(tmp_path / "lpips.safetensors"))
    clip_dir = tiny_clip(tmp_path / "clip")
    res = invoke(["eval", str(ws.path), "--json", "-q", "--edit", "tiger", "--edit", "reconstruction",
                  "--metrics", "lpips,text", "--lpips", str(tmp_path / "lpips.safetensors"),
                  "--clip", str(clip_dir), "--pickscore", str(clip_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    items = json.loads(res.stdout)["items"]
    rec, tiger = items["reconstruction"]["metrics"], items["tiger"]["metrics"]
    assert rec["lpips"] > 0 and rec["lpips_inside"] > 0
    assert tiger["lpips_unedited"] >= 0 and isinstance(tiger["clip_score"], float)
    assert 0 <= tiger["clip_score"] <= 100 and isinstance(tiger["pickscore"], float)
    assert len(items["tiger"]["per_frame"]["clip_score"]) == 4
    bad = invoke(["eval", str(ws.path), "--lpips", str(tmp_path / "missing.pth")])
    assert bad.exit_code == 3 and "no such file" in bad.stderr


def test_json_safe_and_metric_parsing():
    assert json_safe({"a": float("inf"), "b": [float("nan"), np.float32(1.5)]}) == {"a": "inf", "b": [None, 1.5]}
    assert parse_metrics(["fidelity", "clip"]) == ["psnr", "ssim", "lpips", "clip"]
    with pytest.raises(UsageError):
        parse_metrics(["nope"])


def tiny_clip(path: Path) -> Path:
    """A random-weight CLIP (32 px images, printable-ASCII vocabulary) saved as a local HF folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True)
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos,
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path



# ----------------------------------------------------------------------------------------- export seam
# A 640x360 clip in a 128x64 crop workspace (scale 0.2: workspace (x, y) -> source (5x, 5(y + 4))), edit
# region --box 48,16,80,48 = source rows 100..260, columns 240..400; the default feather at 360p is 3 px, so the
# seam's band is the source pixels up to 6 px outside that box.
@pytest.fixture(scope="module")
def seam_ws(tmp_path_factory):
    from test_export import add_edit, make_clip, mask_workspace

    folder = tmp_path_factory.mktemp("seam")
    clip = make_clip(folder / "clip.mp4", width=640, height=360, frames=24, rotation=0, audio=False)
    ws = mask_workspace(clip, folder / "ws.vd", "--size", "128x64", "--box", "48,16,80,48", "--box-only",
                        "--no-ellipse")
    add_edit(ws, "red")
    return ws


def _export_frames(path: Path, frames: list[np.ndarray]) -> None:
    import cv2

    for k, rgb in enumerate(frames):
        assert cv2.imwrite(str(path / f"{k:06d}.png"), np.ascontiguousarray(rgb[..., ::-1]))


def test_seam_is_the_band_difference_of_the_export_in_grey_levels(seam_ws, tmp_path):
    import shutil

    from stages.export import ExportConfig, run_export
    from test_export import probe

    ws_path = tmp_path / "ws.vd"
    shutil.copytree(seam_ws.path, ws_path)
    cfg = EvalConfig(edits=["red"], metrics=["seam"], store=False)
    # no export yet: n/a, not an error
    seam = run_eval(ws_path, cfg)["items"]["red"]["metrics"]["seam"]
    assert seam["available"] is False and "no export" in seam["reason"] and "vd export" in seam["how"]
    run_export(ws_path, ExportConfig(codec="png", color_match=False))
    out = ws_path / "edits/red/export"
    source = [probe(seam_ws.attrs["source"]["path"], keep=range(20, 24))["pixels"][20 + k] for k in range(4)]
    # hand-made exports: the source itself, the source + 5 grey levels, + 6 on the red channel only
    for frames, want in ((source, 0.0), ([s + np.uint8(5) for s in source], 5.0),
                         ([s + np.array([6, 0, 0], np.uint8) for s in source], 2.0)):
        _export_frames(out, frames)
        item = run_eval(ws_path, cfg)["items"]["red"]
        assert item["metrics"]["seam"] == pytest.approx(want, abs=1e-3)
        assert item["per_frame"]["seam"] == pytest.approx([want] * 4, abs=1e-3)
        assert item["export"] == str(out)
    # changes inside the region and more than 6 px outside it leave the band untouched
    moved = [s.copy() for s in source]
    for frame in moved:
        frame[267:, :] = frame[267:, :] // 2
        frame[102:258, 242:398] = 0  # (the mapped box's corner pixels fall outside the region)
    _export_frames(out, moved)
    assert run_eval(ws_path, cfg)["items"]["red"]["metrics"]["seam"] == pytest.approx(0.0, abs=1e-3)


def test_seam_drops_with_the_colour_match_and_follows_the_export(seam_ws, tmp_path):
    import shutil

    from stages.evaluate import is_current
    from stages.export import ExportConfig, run_export
    from stages.io.workspace import Workspace

    ws = Workspace.open(shutil.copytree(seam_ws.path, tmp_path / "ws.vd"))
    frames = ws.read("video/frames").astype(np.float32)
    mask = ws.read("masks/edit") > 0
    shifted = np.clip(frames * 0.92 + np.array([18.0, -12.0, 6.0]), 0, 255).astype(np.uint8)  # a VAE-like shift
    shifted[mask] = (250, 30, 200)
    ws.write_array("edits/red/frames", shifted)
    cfg = EvalConfig(edits=["red"], metrics=["seam"])
    seams = {}
    for match in (False, True):
        run_export(ws, ExportConfig(codec="ffv1", color_match=match, feather=8, force=True))
        assert is_current(ws, cfg)[0] is False  # a new export: the stored seam is stale
        metrics = run_eval(ws, cfg)["items"]["red"]["metrics"]
        assert is_current(ws, cfg) == (True, "")
        seams[match] = metrics["seam"]
        assert metrics["seam_before_match"] > 8.0
        assert (metrics["seam_after_match"] == metrics["seam_before_match"]) is not match
    # measured 9.8 -> 5.5: the match removes the colour step; the detail a 5x upscaled edit lacks stays
    assert 0 < seams[True] < seams[False] - 3.0
    ws.update_attrs("edits/red", timings={"edit": 2.0})  # the edit was redone after its export
    seam = run_eval(ws, cfg)["items"]["red"]["metrics"]["seam"]
    assert seam["available"] is False and "older than the edit" in seam["reason"]


def test_a_moved_workspace_keeps_its_export_and_seam_score(seam_ws, tmp_path):
    """Exports inside the workspace are recorded relative to it ("WS/edits/red/export.mkv") and the seam score
    keys on the export's content: a copy of the workspace elsewhere (another node's scratch, a moved folder,
    file times not kept) needs neither a new export nor a new score."""
    import shutil

    from stages.evaluate import is_current
    from stages.export import ExportConfig, is_current as export_current, run_export
    from stages.io.workspace import Workspace

    ws = Workspace.open(shutil.copytree(seam_ws.path, tmp_path / "a" / "ws.vd"))
    cfg = ExportConfig(codec="ffv1")
    run_export(ws, cfg)
    assert list(ws.group_attrs("edits/red")["exports"]) == ["WS/edits/red/export.mkv"]
    run_eval(ws, EvalConfig(edits=["red"], metrics=["seam"]))
    moved = Workspace.open(shutil.copytree(ws.path, tmp_path / "b" / "ws.vd", copy_function=shutil.copy))
    assert export_current(moved, cfg) == (True, "")
    assert is_current(moved, EvalConfig(edits=["red"], metrics=["seam"])) == (True, "")
    export = moved.path / "edits/red/export.mkv"
    export.write_bytes(export.read_bytes()[:-1] + bytes([export.read_bytes()[-1] ^ 1]))  # another file's bytes
    ok, why = is_current(moved, EvalConfig(edits=["red"], metrics=["seam"]))
    assert not ok and "export" in why
