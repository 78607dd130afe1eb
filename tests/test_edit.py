"""`run_edit` on the tiny model (4 frames, 64 px, 3 steps): identity, ablation switches, outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import make_workspace
from stages.edit.run import EditConfig, edit_latents, load_inversion_for_edit, plan_edit, run_edit, run_edits
from stages.common.errors import InputError
from stages.common.progress import Progress
from stages.io.workspace import Workspace

SOURCE = "A brown bear, walking on rocky terrain, next to a stone wall."
STEPS = 3


def invert(ws, models, subject: str | None = "brown bear", steps: int = STEPS, **kw) -> None:
    """A real (tiny) `vd invert`: DDIM inversion, null-text optimisation with STDG, reconstruction."""
    from stages.invert import InvertConfig, run_invert

    run_invert(ws, InvertConfig(prompt=SOURCE, subject=subject, model="tiny", steps=steps, null_steps=2, **kw),
               Progress(quiet=True), models=models)


def copy_workspace(ws, dest: Path, **inversion_attrs):
    """A copy of an inverted workspace with some inversion attrs changed (cheaper than re-inverting)."""
    shutil.copytree(ws.path, dest)
    copy = Workspace.open(dest)
    if inversion_attrs:
        copy.update_attrs("inversion", **inversion_attrs)
    return copy


@pytest.fixture(scope="module")
def inverted(tiny, tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("edit") / "ws")
    invert(ws, tiny)
    recon = torch.from_numpy(ws.read("inversion/recon_latents"))  # [S] = z*_T ... [0] = final
    return ws, recon.flip(0)


def latent(ws, models, **kw) -> tuple[torch.Tensor, dict]:
    inv = load_inversion_for_edit(ws)
    job = plan_edit(ws, inv, EditConfig(**kw))
    return edit_latents(ws, inv, models, job, Progress(quiet=True))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_identity_edit_without_controls_reproduces_the_reconstruction(inverted, tiny):
    ws, recon = inverted
    e, stats = latent(ws, tiny, prompt=SOURCE, sa1=False, sa2=False, cross=False)
    assert stats["installed"] == {"sa1": 0, "sa2": 0, "cross": 0, "blend": 0}
    # same phi, same G, same update as the inversion's reconstruction: only float noise (batch 4 vs 2)
    torch.testing.assert_close(e, recon[-1], rtol=1e-4, atol=1e-4 * float(recon[-1].abs().max()))


def test_identity_edit_with_all_controls_stays_close(inverted, tiny):
    ws, recon = inverted
    e, stats = latent(ws, tiny, prompt=SOURCE)
    assert stats["calls"]["sa1"] > 0 and stats["calls"]["sa2"] > 0 and stats["calls"]["p2p"] > 0
    other, _ = latent(ws, tiny, prompt="tiger")
    assert rel(e, recon[-1]) < 0.05
    assert rel(e, recon[-1]) < 0.2 * rel(other, recon[-1])  # a real edit moves much further


def test_ablation_switches_change_only_their_part(inverted, tiny):
    ws, _ = inverted
    full, s_full = latent(ws, tiny, prompt="tiger")
    assert s_full["sa1_steps"] == int(STEPS * 0.4) and s_full["cross_steps"] == int(0.8 * (STEPS + 1))
    for flag, gone in (("cross", ["p2p"]), ("sa1", ["sa1"]), ("sa2", ["sa2"]), ("stdg", [])):
        e, s = latent(ws, tiny, prompt="tiger", **{flag: False})
        assert rel(e, full) > 1e-4, flag  # the switch matters
        for key in ("p2p", "sa1", "sa2"):  # ... and leaves the other behaviours exactly as they were
            assert s["calls"].get(key, 0) == (0 if key in gone else s_full["calls"][key]), (flag, key)
    _, s = latent(ws, tiny, prompt="tiger", cross=False)
    assert s["installed"]["cross"] == 0 and s["installed"]["blend"] == 0


def test_background_edit_masks_the_inverse_region(inverted, tiny, monkeypatch):
    """On the real (tiny) UNet, at every SA-II layer and step, --background hides exactly the complement of
    what the foreground edit hides. Which region is then kept and which is free is asserted in
    test_directions.py::test_background_edit_frees_the_background_and_keeps_the_subject_in_every_window."""
    import stages.method.control.editing as editing

    ws, _ = inverted
    with pytest.raises(InputError, match="--preset background --restart"):
        run_edit(ws, EditConfig(prompt="tiger", background=True), models=tiny)
    hides: list[torch.Tensor] = []
    sa2 = editing.sa2_attention

    def spy(q, k, v, hide):
        hides.append(hide.clone())
        return sa2(q, k, v, hide)

    monkeypatch.setattr(editing, "sa2_attention", spy)
    latent(ws, tiny, prompt="tiger", sa1=False, cross=False)
    fg = list(hides)
    hides.clear()
    inv = load_inversion_for_edit(ws)
    job = plan_edit(ws, inv, EditConfig(prompt="tiger", sa1=False, cross=False, background=True))
    edit_latents(ws, inv, tiny, job, Progress(quiet=True))
    assert len(hides) == len(fg) > 0
    assert any(h.any() and not h.all() for h in fg)  # the mask is neither empty nor everything
    for a, b in zip(fg, hides):
        assert torch.equal(b, ~a)


def test_local_blend_keeps_the_outside_at_the_source(inverted, tiny, monkeypatch):
    # The tiny model's random cross-attention maps are nearly uniform, so the word mask (unit-tested in
    # test_editing_attention) covers everything here; pin it to the left half to check the blending itself.
    import stages.method.control.editing as editing

    ws, _ = inverted
    z0 = torch.from_numpy(load_inversion_for_edit(ws).latents[0])
    computed, word_mask = [], editing.LocalBlend.mask

    def half_mask(self):
        computed.append(word_mask(self))
        m = torch.zeros_like(computed[-1])
        m[..., :4] = 1
        return m

    monkeypatch.setattr(editing.LocalBlend, "mask", half_mask)
    e, stats = latent(ws, tiny, prompt="tiger", blend=["tiger", "bear"])
    assert len(computed) == STEPS and computed[0].shape == (4, 1, 8, 8) and stats["installed"]["blend"] == 5
    assert torch.equal(e[..., 4:], z0[..., 4:])  # outside: exactly the source latent after the last step
    assert not (e[..., :4] == z0[..., :4]).all(dim=1).any()
    with pytest.raises(InputError, match="blend word"):
        latent(ws, tiny, prompt="tiger", blend=["lion"])


def test_outputs_attrs_and_name_checks(inverted, tiny, tmp_path):
    ws, _ = inverted
    out = tmp_path / "copy.mp4"
    res = run_edit(ws, EditConfig(prompt="tiger", reweight={"Tiger": 2.0}, output=str(out)), models=tiny)
    assert res["name"] == "tiger" and res["resolved_prompt"] == SOURCE.replace("brown bear", "tiger")
    frames = ws.read("edits/tiger/frames")
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    for path in (ws.file_path("edits/tiger/edit.mp4"), out):
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            assert sum(1 for _ in c.decode(stream)) == 4
            assert float(stream.average_rate) == pytest.approx(8.0)
    assert ws.file_path("edits/tiger/preview.gif").stat().st_size > 0
    attrs = ws.group_attrs("edits/tiger")
    assert attrs["status"] == "done" and attrs["prompt"] == "tiger" and attrs["source_prompt"] == SOURCE
    assert attrs["words"] == ["tiger"] and attrs["params"]["reweight"] == {"Tiger": 2.0}
    assert attrs["model"]["fingerprint"] == tiny.fingerprint and set(attrs["timings"]) >= {"edit", "decode"}
    with pytest.raises(InputError, match="already exists"):
        run_edit(ws, EditConfig(prompt="tiger"), models=tiny)
    with pytest.raises(InputError, match="not in the target prompt"):
        run_edit(ws, EditConfig(prompt="tiger", name="x", reweight={"lion": 2.0}), models=tiny)


def test_run_edits_and_fingerprint_check(inverted, tiny):
    ws, _ = inverted
    res = run_edits(ws, [EditConfig(prompt="wolf", force=True), EditConfig(prompt="A lion, walking on rocky terrain")],
                    models=tiny)
    assert [r["name"] for r in res] == ["wolf", "lion"]
    with pytest.raises(InputError, match="would be named"):
        run_edits(ws, [EditConfig(prompt="wolf", force=True), EditConfig(prompt="wolf", force=True)], models=tiny)

    class Other:
        fingerprint, spec = "other-model", "other"

    with pytest.raises(InputError, match="workspace was inverted with model tiny"):
        run_edit(ws, EditConfig(prompt="fox"), models=Other())


def test_errors_without_inversion_or_subject(inverted, tiny, tmp_path):
    ws = make_workspace(tmp_path / "bare")
    with pytest.raises(InputError, match="no inversion"):
        run_edit(ws, EditConfig(prompt="tiger"), models=tiny)
    nosubj = copy_workspace(inverted[0], tmp_path / "nosubj", subject=None)
    with pytest.raises(InputError, match="re-invert with --subject"):
        run_edit(nosubj, EditConfig(prompt="tiger"), models=tiny)
    other = copy_workspace(inverted[0], tmp_path / "other", subject="polar bear")
    with pytest.raises(InputError, match="does not contain the subject"):
        run_edit(other, EditConfig(prompt="tiger"), models=tiny)
