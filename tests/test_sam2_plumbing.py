"""`vd mask` -> SAM2 plumbing with the real predictor class and its networks replaced by a stub.

The stub records what SAM2 hands its networks (the frame images, the prompt points/boxes in model
pixels) and "segments" the bright object within the prompt's reach in the image it was given, so the
tracked masks show whether frames, coordinates and propagation line up. Output frames are 128x64
(WIDTHxHEIGHT, non-square) from 160x96 sources, for each of crop/pad/stretch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.models import sam2_track
from stages.io import video as vid
from stages.mask.run import MaskConfig, run_mask
from stages.io.workspace import Workspace

FRAMES, OUT_W, OUT_H = 5, 128, 64
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture(scope="module")
def predictor():
    return sam2_track.load_predictor(None, "cpu")  # the real class (random weights, 256 px)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """160x96 PNG frames: a bright disc (static) on a background whose grey level names the frame."""
    folder = tmp_path_factory.mktemp("frames")
    yy, xx = np.mgrid[0:96, 0:160]
    disc = (xx - 100) ** 2 + (yy - 40) ** 2 <= 14**2
    for k in range(FRAMES):
        frame = np.full((96, 160, 3), 20 + 30 * k, np.uint8)
        frame[disc] = 250
        Image.fromarray(frame).save(folder / f"f{k}.png")
    return folder


class StubNetworks:
    """Stands in for the image encoder, the SAM heads + memory attention (track_step) and the memory
    encoder of one predictor instance; everything between them is SAM2's own code."""

    def __init__(self, predictor, monkeypatch):
        self.size = predictor.image_size
        self.images: dict[int, torch.Tensor] = {}
        self.prompts: list[tuple[int, np.ndarray, np.ndarray]] = []  # frame, coords (model px), labels
        self.tracked: list[tuple[int, bool]] = []  # frames segmented from memory, with the direction
        self.region: torch.Tensor | None = None  # where the prompt lets the stub look, model pixels
        monkeypatch.setattr(predictor, "_get_image_feature", self.image_feature)
        monkeypatch.setattr(predictor, "track_step", self.track_step)
        monkeypatch.setattr(predictor, "_encode_new_memory", self.encode_memory)

    def image_feature(self, state, frame_idx, batch_size):
        image = state["images"][frame_idx].float()
        self.images[frame_idx] = image.clone()
        return image[None], None, None, None, None

    def _reach(self, coords: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        if 2 in labels:  # a box: its two corners come first with labels 2 and 3
            (x0, y0), (x1, y1) = coords[list(labels).index(2)], coords[list(labels).index(3)]
            return (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        reach = torch.zeros(self.size, self.size, dtype=torch.bool)
        for (x, y), label in zip(coords, labels):
            if label == 1:
                reach |= (xx - x) ** 2 + (yy - y) ** 2 <= 48**2
        return reach

    def track_step(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                   feat_sizes, point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse=False,
                   run_mem_encoder=True, prev_sam_mask_logits=None):
        if point_inputs is not None:
            coords = point_inputs["point_coords"][0].cpu().numpy()
            labels = point_inputs["point_labels"][0].cpu().numpy()
            self.prompts.append((frame_idx, coords, labels))
            self.region = self._reach(coords, labels)
        else:
            self.tracked.append((frame_idx, bool(track_in_reverse)))
        assert self.region is not None, "a frame was tracked before any prompt"
        rgb = self.images[frame_idx] * STD + MEAN
        hit = (rgb.mean(0) > 0.8) & self.region
        low = torch.nn.functional.avg_pool2d(hit[None, None].float(), 4) > 0.5  # SAM2's low-res masks
        logits = torch.where(low, 10.0, -10.0)
        memory = (torch.zeros(1, 1, 1, 1), [torch.zeros(1, 1, 1, 1)]) if run_mem_encoder else (None, None)
        return {"pred_masks": logits, "obj_ptr": torch.zeros(1, 8), "object_score_logits": torch.full((1, 1), 10.0),
                "maskmem_features": memory[0], "maskmem_pos_enc": memory[1]}

    def encode_memory(self, current_vision_feats, feat_sizes, pred_masks_high_res, object_score_logits,
                      is_mask_from_pts):
        return torch.zeros(1, 1, 1, 1), [torch.zeros(1, 1, 1, 1)]


def _disc(frames: np.ndarray) -> np.ndarray:
    return frames.mean(axis=-1) > 200


def _centre(mask) -> tuple[float, float]:
    ys, xs = np.nonzero(np.asarray(mask))
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("resize, prompt, prompt_frame", [("crop", "point", 2), ("pad", "box", 4),
                                                           ("stretch", "point", 0)])
def test_prompts_frames_and_propagation_reach_sam2_in_output_pixels(predictor, clip, tmp_path, monkeypatch,
                                                                    resize, prompt, prompt_frame):
    expected = vid.load_clip(clip, FRAMES, f"{OUT_W}x{OUT_H}", resize=resize).frames
    disc = _disc(expected)
    cx, cy = _centre(disc[prompt_frame])
    ys, xs = np.nonzero(disc[prompt_frame])
    box = (float(xs.min()) - 2, float(ys.min()) - 2, float(xs.max()) + 3, float(ys.max()) + 3)
    stub = StubNetworks(predictor, monkeypatch)
    monkeypatch.setattr(sam2_track, "load_predictor", lambda checkpoint, device="auto": predictor)
    options = {"points": [f"{cx:.2f},{cy:.2f}"]} if prompt == "point" else {"box": ",".join(f"{v:g}" for v in box)}
    result = run_mask(clip, tmp_path / "ws", MaskConfig(frames=FRAMES, size=f"{OUT_W}x{OUT_H}", resize=resize,
                                                        sam2="random", device="cpu", prompt_frame=prompt_frame,
                                                        ellipse=False, **options))
    ws = Workspace.open(result["workspace"])
    assert np.array_equal(ws.read("video/frames"), expected)

    # one prompt, on the prompt frame, scaled from output pixels to the model's 256 px square
    sx, sy = 256 / OUT_W, 256 / OUT_H
    assert len(stub.prompts) == 1 and stub.prompts[0][0] == prompt_frame
    _, coords, labels = stub.prompts[0]
    if prompt == "point":
        np.testing.assert_allclose(coords, [[round(cx, 2) * sx, round(cy, 2) * sy]], rtol=1e-5)
        assert labels.tolist() == [1]
    else:
        np.testing.assert_allclose(coords, [[box[0] * sx, box[1] * sy], [box[2] * sx, box[3] * sy]], rtol=1e-5)
        assert labels.tolist() == [2, 3]

    # the network saw the workspace's (cropped / padded / stretched) frames, each at its own index
    for k in range(FRAMES):
        rgb = (stub.images[k] * STD + MEAN).numpy()
        assert abs(float(rgb.mean()) - float(expected[k].mean()) / 255) < 0.01, k
        seen = rgb.mean(0) > 0.8
        x, y = _centre(seen)
        ex, ey = _centre(disc[k])
        assert abs(x / sx - ex) < 1.5 and abs(y / sy - ey) < 1.5, (k, x / sx, y / sy, ex, ey)

    # propagation: forward from the prompt frame to the end, then backward to frame 0, each frame once
    forward = [(k, False) for k in range(prompt_frame + 1, FRAMES)]
    backward = [(k, True) for k in range(prompt_frame - 1, -1, -1)]
    assert stub.tracked == forward + backward

    raw = ws.read("masks/raw").astype(bool)
    for k in range(FRAMES):
        inter, union = (raw[k] & disc[k]).sum(), (raw[k] | disc[k]).sum()
        assert inter / union > 0.8, (k, inter, union)
