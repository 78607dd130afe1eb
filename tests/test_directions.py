"""Where the edit acts (ALGORITHM.md §5.4, decision 8), measured on the latents of the real edit stage.

The tiny model's random attention is near uniform, so it cannot show a spatial effect; SA-II is driven
here through its real handler with nearest-position queries/keys (tests/fake_unet.py, mode "local"):
an edit-branch token attends to the source token at its own position unless SA-II hides that key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.method.control.editing as editing
from conftest import make_workspace
from fake_unet import FakeEditUNet, fake_inversion
from stages.edit.run import EditConfig, edit_latents, plan_edit
from stages.common.progress import Progress

FRAMES, STEPS = 2, 5


@pytest.fixture
def half_ws(tmp_path):
    """64 px frames (8x8 latents) with masks/edit covering the left half: latent columns 0-3."""
    ws = make_workspace(tmp_path / "ws", frames=FRAMES, size=64)
    mask = np.zeros((FRAMES, 64, 64), np.uint8)
    mask[:, :, :32] = 1
    ws.write_array("masks/edit", mask)
    return ws


def _edit(ws, tiny, inv, **kw):
    job = plan_edit(ws, inv, EditConfig(prompt="tiger", **kw))
    return edit_latents(ws, inv, tiny, job, Progress(quiet=True))[0]


def _inside_outside(e: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (e - ref).abs()
    return float(d[..., :4].mean()), float(d[..., 4:].mean())


@pytest.mark.parametrize("background", [False, True])
def test_sa2_lets_the_edited_region_move_and_holds_the_other_to_the_source(half_ws, tiny, monkeypatch, background):
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    z0 = torch.from_numpy(inv.latents[0])
    # without new content the edit follows the source path exactly (the stand-in is consistent with it)
    FakeEditUNet(monkeypatch, mode="local", noise=inv.attrs["noise"], push=0.0)
    still = _edit(half_ws, tiny, inv, sa1=False, cross=False, tau_s=0.0, background=background)
    assert float((still - z0).abs().max()) < 1e-4
    monkeypatch.undo()
    FakeEditUNet(monkeypatch, mode="local", noise=inv.attrs["noise"], push=0.01)
    e = _edit(half_ws, tiny, inv, sa1=False, cross=False, tau_s=0.0, background=background)
    inside, outside = _inside_outside(e, z0)
    edited, kept = (outside, inside) if background else (inside, outside)
    # the edited region keeps all of the new content, the other half of it (source key at the same place)
    assert edited > 1.5 * kept > 0, (inside, outside)


def test_sa2_hides_the_mask_or_its_complement_at_every_step(half_ws, tiny, monkeypatch):
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    left = torch.zeros(FRAMES, 8, 8, dtype=torch.bool)
    left[..., :4] = True
    for background, hidden in ((False, left), (True, ~left)):
        fake = FakeEditUNet(monkeypatch)
        _edit(half_ws, tiny, inv, tau_s=0.4, background=background)
        assert sorted(fake.hides) == [2, 3, 4]  # SA-II from int(5 * 0.4) = 2 on
        for step, hides in fake.hides.items():
            for hide in hides:
                assert torch.equal(hide, hidden.reshape(FRAMES, 64)), (background, step)
        monkeypatch.undo()


def test_local_blend_holds_the_outside_on_the_source_path_from_its_start_step(half_ws, tiny, monkeypatch):
    """Outside the blend mask the edit latent equals the inversion path latents[S-1-i] after every step
    i >= int(S * blend_start) = int(5 * 0.2) = 1, and not at step 0."""
    seen = []

    def left_half(self):
        seen.append(self.threshold)
        m = torch.zeros(FRAMES, 1, 8, 8)
        m[..., :4] = 1
        return m

    monkeypatch.setattr(editing.LocalBlend, "mask", left_half)
    fake = FakeEditUNet(monkeypatch)
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    final = _edit(half_ws, tiny, inv, blend=["tiger"])
    lat = torch.from_numpy(inv.latents)
    after = [z[0] for _, z, _ in fake.inputs[1:]] + [final]  # edit latent after step i
    assert len(after) == STEPS and seen == [0.3] * (STEPS - 1)
    for i, e in enumerate(after):
        source = lat[STEPS - 1 - i]
        same_outside = torch.equal(e[..., 4:], source[..., 4:])
        assert same_outside == (i >= 1), i
        assert not (e[..., :4] == source[..., :4]).any(), i  # inside: the edit's own latent


class WindowedLocalUNet(FakeEditUNet):
    """FakeEditUNet "local" over a windowed clip: each call gets its own window's source noise (the
    windows run in order within a step)."""

    def __init__(self, monkeypatch, spans, noise, push):
        super().__init__(monkeypatch, mode="local", noise=noise, push=push)
        self.spans, self.clip_noise = spans, noise

    def __call__(self, models, z, t, emb):
        s, e = self.spans[len(self.inputs) % len(self.spans)]
        assert z.shape[1] == e - s
        self.noise = self.clip_noise[s:e]
        return super().__call__(models, z, t, emb)


@pytest.mark.parametrize("background", [False, True])
def test_background_edit_frees_the_background_and_keeps_the_subject_in_every_window(tmp_path, tiny, monkeypatch,
                                                                                     background):
    """10 frames in windows (0,4) (2,6) (4,8) (6,10), a subject box that moves per frame (latent rows 2-5,
    columns a..a+3, a = f mod 5). Where SA-II hides the source keys the edit takes all of the new content
    (free), elsewhere half of it (kept, the source key at the same place): with --background the subject
    box is kept and everything around it is free; without it the other way round, pixel by pixel."""
    from stages.method.windows import plan_windows

    frames = 10
    windows = plan_windows(frames, 4, 2)
    assert len(windows.spans) == 4
    ws = make_workspace(tmp_path / "ws", frames=frames, size=64)
    box = torch.zeros(frames, 8, 8, dtype=torch.bool)
    for f in range(frames):
        box[f, 2:6, f % 5:f % 5 + 4] = True
    ws.write_array("masks/edit", box.repeat_interleave(8, 1).repeat_interleave(8, 2).numpy().astype(np.uint8))
    inv = fake_inversion(tiny, STEPS, frames, (8, 8))
    inv.attrs["windows"] = windows.describe()
    z0 = torch.from_numpy(inv.latents[0])
    fake = WindowedLocalUNet(monkeypatch, windows.spans, inv.attrs["noise"], push=0.01)
    e = _edit(ws, tiny, inv, sa1=False, cross=False, tau_s=0.0, background=background)
    assert len(fake.inputs) == STEPS * len(windows.spans)
    d = (e - z0).abs().mean(dim=1)  # (F, 8, 8): the same new content in every channel
    free = ~box if background else box
    scale = float(d[free].mean())
    assert scale > 0
    expected = torch.where(free, 1.0, 0.5)
    for f in range(frames):  # each frame's own mask, whichever window(s) it sits in
        torch.testing.assert_close(d[f] / scale, expected[f], rtol=0, atol=1e-3, msg=f"frame {f}")
