"""`vd batch` with the manifest key `export:`: checked with the rest of the manifest before anything runs,
written by the worker after the edits through stages.export (run_export, is_current), listed in the report,
skipped when current and redone when its settings change. Local engine, tiny model, 4 frames, 64 px, 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_batch import MANIFEST as BATCH_MANIFEST, batch, report, write_clips

# test_batch's defaults with one clip, the seam metric and an export
MANIFEST = (BATCH_MANIFEST.split("clips:\n")[0].replace("[psnr, ssim]", "[seam]")
            + "  export: {codec: ffv1, color_match: off}\nclips:\n  - clip: clips/a.mp4\n")


def frames_of(path: Path) -> tuple[int, tuple[int, int]]:
    import av

    with av.open(str(path)) as c:
        frames = [f for f in c.decode(c.streams.video[0])]
        return len(frames), (frames[0].height, frames[0].width)


def test_export_key_writes_lists_skips_and_redoes(tmp_path):
    import stages.models.load

    write_clips(tmp_path)
    (tmp_path / "m.yaml").write_text(MANIFEST)
    out = tmp_path / "runs"
    r = batch(tmp_path / "m.yaml", "--out", out, "--threads-per-worker", 1, "-q", "--json")
    assert r.exit_code == 0, r.output
    rep = report(r)
    clip = rep["clips"][0]
    path = out / "a.vd" / "edits" / "blue-cube" / "export.mkv"
    assert clip["exports"] == {"blue-cube": str(path)} and rep["exports"] == {"a": {"blue-cube": str(path)}}
    assert clip["run"] == ["mask", "invert", "edit", "export", "eval"]
    assert frames_of(path) == (4, (64, 64))  # the source's size: the 64 px clip at its own resolution
    seam = clip["metrics"]["blue-cube"]["seam"]
    assert isinstance(seam, float) and seam >= 0  # eval ran after the export, so the seam has a number
    from stages.batch.report import export_lines

    assert export_lines(rep) == [f"a: export blue-cube -> {path}"]
    # a rerun: every stage current, no model loaded
    loads = []
    real = stages.models.load.load_models
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.models.load, "load_models", lambda spec, **kw: loads.append(spec) or real(spec, **kw))
        again = report(batch(tmp_path / "m.yaml", "--out", out, "-q", "--json"))
        assert again["clips"][0]["skipped"] == ["mask", "invert", "edit", "export", "eval"] and loads == []
        assert again["clips"][0]["exports"] == {"blue-cube": str(path)}
        # another feather: the export is redone, then the seam it scored
        (tmp_path / "m.yaml").write_text(MANIFEST.replace("color_match: off}", "color_match: off, feather: 1}"))
        third = report(batch(tmp_path / "m.yaml", "--out", out, "-q", "--json"))["clips"][0]
        assert third["run"] == ["export", "eval"] and loads == []
        assert "feather" in third["stages"]["export"]["why"]
        assert "export changed" in third["stages"]["eval"]["why"]
    from stages.io.workspace import Workspace

    # recorded relative to the workspace: the record holds on another node's copy of it
    record = Workspace.open(out / "a.vd").group_attrs("edits/blue-cube")["exports"]["WS/edits/blue-cube/export.mkv"]
    assert record["settings"]["feather"] == 1 and record["settings"]["codec"] == "ffv1"


def test_export_settings_merge_and_turn_off(tmp_path):
    from stages.batch.manifest import load_manifest

    (tmp_path / "m.yaml").write_text(
        "defaults: {prompt: a dog, box: [1, 1, 9, 9], box_only: true, export: {codec: h265, crf: 30}}\n"
        "clips:\n"
        "  - {clip: a.mp4}\n"
        "  - {clip: b.mp4, export: {crf: 22, whole_clip: true, color_match: 'off'}}\n"
        "  - {clip: c.mp4, export: false}\n"
        "  - {clip: d.mp4, export: true}\n")
    a, b, c, d = load_manifest(tmp_path / "m.yaml").clips
    assert (a.export.codec, a.export.crf, a.export.whole_clip, a.export.color_match) == ("h265", 30, False, True)
    assert (b.export.codec, b.export.crf, b.export.whole_clip, b.export.color_match) == ("h265", 22, True, False)
    assert c.export is None
    assert (d.export.codec, d.export.crf, d.export.feather) == ("h264", None, None)  # `true`: vd export's defaults
    (tmp_path / "n.yaml").write_text("clips:\n  - {clip: a.mp4, prompt: a dog, box: [1, 1, 9, 9], box_only: true}\n")
    assert load_manifest(tmp_path / "n.yaml").clips[0].export is None  # no key: no export


BAD = [
    ("export: {output: x.mp4}", "clips[0], export: 'output' is not a manifest setting"),
    ("export: {force: true}", "clips[0], export: 'force' is not a manifest setting"),
    ("export: {bitrate: 5}", "'bitrate' is not an export setting"),
    ("export: {codec: vp9}", "clips[0], export: --codec 'vp9'"),
    ("export: {codec: png, crf: 10}", "clips[0], export: --crf applies to h264 and h265"),
    ("export: {feather: 9999}", "clips[0], export: --feather"),
    ("export: {crf: high}", "crf"),
    ("export: yes please", "must be true, false or a mapping"),
    ("stride: 2, export: {whole_clip: true}", "whole_clip needs consecutive frames"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split(":")[-1][:24] for _, m in BAD])
def test_bad_export_key_is_one_error_and_runs_nothing(tmp_path, extra, message):
    (tmp_path / "m.yaml").write_text(f"clips:\n  - {{clip: a.mp4, prompt: a dog, box: [1, 1, 9, 9], {extra}}}\n")
    r = batch(tmp_path / "m.yaml", "--out", tmp_path / "runs", "-q")
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: manifest ") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_only_export_runs_just_the_export(tmp_path):
    """--only takes export like the other stages (here it fails the clip: there is no workspace yet)."""
    write_clips(tmp_path)
    (tmp_path / "m.yaml").write_text(MANIFEST)
    r = batch(tmp_path / "m.yaml", "--out", tmp_path / "runs", "--only", "export", "-q", "--json")
    assert r.exit_code == 1
    failed = json.loads(r.stdout)["failed"][0]
    assert failed["stage"] == "export"
