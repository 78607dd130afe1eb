"""`vd mask --text ... --detector random` (issue 26): a tiny untrained Grounding DINO built in memory, seeded,
named "tiny-random" in the log, the masks attrs and --json; with `--sam2 random` --text runs without weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from stages.io.synthetic import moving_disc
from stages.io.workspace import Workspace
from stages.models import detector as det
from test_box_only_objects import write_frames
from vdcli.app import app

FRAMES, SIZE = 2, 64


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_frames(tmp_path_factory.mktemp("frames"), FRAMES, SIZE, seed=2)


def test_random_detector_is_seeded_and_knows_the_phrase_words():
    image = moving_disc(1, SIZE, SIZE, seed=2)[0][0]
    one, two = det.random_detector(["red t-shirt"], "cpu"), det.random_detector(["red t-shirt"], "cpu")
    assert one.source == det.RANDOM_NAME == "tiny-random"
    vocab = one.processor.tokenizer.get_vocab()
    assert {"red", "t", "-", "shirt", "."} <= set(vocab)
    first, again = det.detect(one, image, "red t-shirt"), det.detect(two, image, "red t-shirt")
    assert first and first == again  # same seed, same boxes and scores
    assert det.resolve_detector("random") == det.RANDOM


def test_text_with_the_random_detector_and_random_sam2_through_the_cli(clip, tmp_path, monkeypatch):
    monkeypatch.setenv(det.ENV_DETECTOR, str(tmp_path / "none"))  # no real weights anywhere
    ws_path = tmp_path / "ws"
    r = CliRunner().invoke(app, ["mask", str(clip), "--frames", str(FRAMES), "--size", str(SIZE), "-o", str(ws_path),
                                 "--sam2", "random", "--detector", "random", "--text", "red ball", "--json"])
    assert r.exit_code == 0, r.output
    assert "detector: tiny-random (untrained" in r.stderr
    out = json.loads(r.stdout)
    assert out["mask"]["detector"] == "tiny-random" and out["mask"]["sam2"] == "random"
    found = out["objects"][0]
    assert found["text"] == "red ball" and 0.3 <= found["score"] <= 1 and len(found["box"]) == 4
    ws = Workspace.open(ws_path)
    attrs = ws.group_attrs("masks")
    assert attrs["detector"] == "tiny-random" and attrs["objects"][0]["box"] == found["box"]
    assert ws.read("masks/raw").shape == (FRAMES, SIZE, SIZE) and np.asarray(ws.read("masks/raw"))[0].any()
