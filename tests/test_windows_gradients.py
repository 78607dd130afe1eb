"""Long-clip windows where a wrong index, slice offset or weight would hide: the windowed null-text
gradient, the windowed STDG gradient and the windowed local-blend masks of `vd edit` (issue 22).

Every reference is computed in this file, independently of the function under test: the clip
`plan_windows(10, 4, 2)` (four windows, every inner frame shared by two) is blended with the window
weights written out below by hand, through a stand-in UNet whose output depends on each frame's latent
and null embedding and on the other frames of its window (like the motion module), and autograd
differentiates that hand-written blend. Float64 throughout, so "equal" means equal to rounding.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import pytest
import torch

import stages.invert.nulltext
import stages.invert.passes
import stages.method.control.editing as editing
from conftest import make_workspace
from fake_unet import FakeEditUNet, fake_inversion, hand_ddim
from stages.common.progress import Progress
from stages.invert import Passes
from stages.invert.nulltext import _null_text_backward_windowed
from stages.invert.stdg import _windowed_stdg
from stages.edit.run import EditConfig, edit_latents, plan_edit
from stages.edit.sampling import _blend_mask
from stages.method.windows import plan_windows

FRAMES = 10
SPANS = ((0, 4), (2, 6), (4, 8), (6, 10))  # plan_windows(10, 4, 2): stride 2, the last one ends at frame 10
# window k's weight for each of its frames: a linear ramp over the 2 shared frames, 1 at the clip's ends
HAND_WEIGHTS = ((1.0, 1.0, 2 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3, 1 / 3),
                (1 / 3, 2 / 3, 1.0, 1.0))
T, TP, SCALE = 501, 481, 7.5
DT = torch.float64


def window_unet(models: Any, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """Stand-in unet_eps for z (B, f, 4, h, w) and emb (B*f, ...) batch-major: per frame a nonlinear term of
    its own embedding and latent, plus a window context mixing the window's frames by their position."""
    b, f = z.shape[:2]
    own = torch.tanh(emb.reshape(b, f, -1)).mean(-1)  # (B, f)
    pos = torch.arange(1, f + 1, dtype=z.dtype)
    ctx = (pos * own * z.mean(dim=(2, 3, 4))).mean(1, keepdim=True)  # (B, 1)
    per = own[..., None, None, None]
    return 0.5 * z + 1e-3 * t + per * (1.0 + 0.2 * z) + ctx[..., None, None, None] * torch.cos(z)


def _weights(k: int) -> torch.Tensor:
    return torch.tensor(HAND_WEIGHTS[k], dtype=DT).view(1, -1, 1, 1, 1)


def _hand_blend(run: Any, like: torch.Tensor) -> torch.Tensor:
    """sum_k w_k run(s_k, e_k) placed at frames s_k..e_k-1, written out (no stages.method.windows)."""
    out = torch.zeros_like(like)
    for k, (s, e) in enumerate(SPANS):
        out[:, s:e] = out[:, s:e] + _weights(k) * run(s, e)
    return out


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, FRAMES, 4, 3, 3, generator=g, dtype=DT)
    return {"z": z, "target": z + 0.1 * torch.randn(z.shape, generator=g, dtype=DT),
            "G": 0.05 * torch.randn(z.shape, generator=g, dtype=DT),
            "eps_c": torch.randn(z.shape, generator=g, dtype=DT),
            "z_star": z + 0.2 * torch.randn(z.shape, generator=g, dtype=DT),
            "phi": torch.randn(FRAMES, 2, 6, generator=g, dtype=DT),  # a distinct null text per frame
            "c": torch.randn(FRAMES, 2, 6, generator=g, dtype=DT),
            "mask": torch.rand(FRAMES, 3, 3, generator=g, dtype=DT) > 0.4}


def test_the_plan_and_its_weights_are_the_hand_table():
    windows = plan_windows(FRAMES, 4, 2)
    assert windows.spans == SPANS
    for row, hand in zip(windows.weights(), HAND_WEIGHTS):
        assert row == pytest.approx(hand, abs=1e-12)


@pytest.fixture
def stand_in(monkeypatch):
    """Route every UNet call of the inversion engine to window_unet."""
    modules = [importlib.import_module(m) for m in ("stages.models.ops", "stages.models.load")
               if importlib.util.find_spec(m) is not None]
    # plus the engine's own modules, in case one imports unet_eps at module level
    modules += [stages.invert.passes, stages.invert.nulltext]
    patched = 0
    for module in modules:
        if hasattr(module, "unet_eps"):
            monkeypatch.setattr(module, "unet_eps", window_unet)
            patched += 1
    assert patched, "no module defines unet_eps"


@pytest.mark.parametrize("shared", [False, True])
def test_windowed_null_text_gradient_is_autograd_through_the_hand_blend(stand_in, shared):
    d = _data()
    phi0 = d["phi"][:1] if shared else d["phi"]

    phi = phi0.clone().requires_grad_(True)
    rows = phi.expand(FRAMES, -1, -1)
    eps_u = _hand_blend(lambda s, e: window_unet(None, d["z"][:, s:e], T, rows[s:e]), d["z"])
    eps = d["eps_c"] + SCALE * (d["eps_c"] - eps_u)  # the reference's CFG form
    ref_loss = ((hand_ddim(d["z"], eps, T, TP, d["G"]) - d["target"]) ** 2).mean()
    ref_loss.backward()

    passes = Passes(None, windows=plan_windows(FRAMES, 4, 2))
    phi_b = phi0.clone().requires_grad_(True)
    loss = _null_text_backward_windowed(passes, d["z"], T, TP, phi_b, d["eps_c"], d["G"], d["target"], SCALE)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    assert phi_b.grad is not None and phi_b.grad.shape == phi0.shape
    for f in range(phi0.shape[0]):  # every frame's gradient row, the frames after the first window included
        assert phi.grad[f].abs().max() > 1e-6, f
        torch.testing.assert_close(phi_b.grad[f], phi.grad[f], rtol=1e-9, atol=1e-14, msg=f"frame {f}")
    assert passes.backwards == len(SPANS)


class WindowSTDG:
    """Stand-in for one window's STDG: its own frames' condition rows and subject mask; the statistics are
    window_unet's output (GT from z*, generated from z), compared over the subject and over the rest."""

    def __init__(self, c: torch.Tensor, mask: torch.Tensor):
        self.c, self.mask = c, mask

    def targets(self, z_star: torch.Tensor, t: int, need: tuple[bool, bool]) -> torch.Tensor:
        assert need == (True, True)
        return window_unet(None, z_star, t, self.c).detach()

    def gradient(self, z: torch.Tensor, t: int, targets: torch.Tensor,
                 components: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float],
                                                       dict[str, torch.Tensor]]:
        zg = z.detach().clone().requires_grad_(True)
        out = window_unet(None, zg, t, self.c)
        losses = stdg_losses(out, targets, self.mask)
        g = torch.autograd.grad(combined(losses), zg, retain_graph=True)[0]
        comps = {n: torch.autograd.grad(losses[n], zg, retain_graph=True)[0] for n in components}
        return g, out.detach(), {n: float(v.detach()) for n, v in losses.items()}, comps


def stdg_losses(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    m = mask[None, :, None].to(out.dtype)  # (1, f, 1, h, w)
    sq = (out - target) ** 2
    return {"T_fg": (sq * m).mean(), "K_bg": (sq.sin() * (1 - m)).mean()}


def combined(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return 2.0 * losses["T_fg"] + 0.5 * losses["K_bg"]


def test_windowed_stdg_gradient_is_autograd_through_the_hand_weights():
    d = _data(1)
    stdgs = [WindowSTDG(d["c"][s:e], d["mask"][s:e]) for s, e in SPANS]
    G, eps_c, targets, losses, comps = _windowed_stdg(stdgs, plan_windows(FRAMES, 4, 2), d["z_star"], d["z"], T,
                                                      (True, True), ("T_fg", "K_bg"))

    # reference: one graph over the clip; window k sees z[s:e] with its gradient scaled by its weights
    z = d["z"].clone().requires_grad_(True)
    total = torch.zeros((), dtype=DT)
    parts: dict[str, Any] = {"T_fg": 0.0, "K_bg": 0.0}
    for k, (s, e) in enumerate(SPANS):
        w = _weights(k)
        zk = w * z[:, s:e] + (1 - w) * z[:, s:e].detach()  # value z, gradient w * dL/dz
        ls = stdg_losses(window_unet(None, zk, T, d["c"][s:e]),
                         window_unet(None, d["z_star"][:, s:e], T, d["c"][s:e]).detach(), d["mask"][s:e])
        total = total + combined(ls)
        for n in parts:
            parts[n] = parts[n] + ls[n]
    ref_G = torch.autograd.grad(total, z, retain_graph=True)[0]
    ref_comps = {n: torch.autograd.grad(v, z, retain_graph=True)[0] for n, v in parts.items()}
    ref_eps = _hand_blend(lambda s, e: window_unet(None, d["z"][:, s:e], T, d["c"][s:e]), d["z"])

    for f in range(FRAMES):
        assert ref_G[0, f].abs().max() > 1e-4, f
        torch.testing.assert_close(G[0, f], ref_G[0, f], rtol=1e-9, atol=1e-14, msg=f"G, frame {f}")
        for n in parts:
            torch.testing.assert_close(comps[n][0, f], ref_comps[n][0, f], rtol=1e-9, atol=1e-14,
                                       msg=f"{n}, frame {f}")
    torch.testing.assert_close(eps_c, ref_eps, rtol=1e-12, atol=1e-14)
    assert losses == pytest.approx({n: float(v.detach()) / len(SPANS) for n, v in parts.items()}, rel=1e-12)
    for (s, e), tg in zip(SPANS, targets):  # each window's targets come from its own frames of z*
        torch.testing.assert_close(tg, window_unet(None, d["z_star"][:, s:e], T, d["c"][s:e]))


class PinnedMask:
    """A local-blend recorder stand-in for window k: column k marks the window, column 4 + j its j-th frame."""

    def __init__(self, k: int, recorded: bool = True):
        self.k, self.recorded = k, recorded

    def mask(self) -> torch.Tensor | None:
        if not self.recorded:
            return None
        m = torch.zeros(4, 1, 1, 8)
        m[..., self.k] = 1
        for j in range(4):
            m[j, ..., 4 + j] = 1
        return m


# the windows' masks mixed per frame with HAND_WEIGHTS, window 2 recorded nothing (a zero mask)
BLENDED = [
    [1, 0, 0, 0, 1, 0, 0, 0],
    [1, 0, 0, 0, 0, 1, 0, 0],
    [2 / 3, 1 / 3, 0, 0, 1 / 3, 0, 2 / 3, 0],
    [1 / 3, 2 / 3, 0, 0, 0, 2 / 3, 0, 1 / 3],
    [0, 2 / 3, 0, 0, 0, 0, 2 / 3, 0],
    [0, 1 / 3, 0, 0, 0, 0, 0, 1 / 3],
    [0, 0, 0, 1 / 3, 1 / 3, 0, 0, 0],
    [0, 0, 0, 2 / 3, 0, 2 / 3, 0, 0],
    [0, 0, 0, 1, 0, 0, 1, 0],
    [0, 0, 0, 1, 0, 0, 0, 1],
]


def test_windowed_blend_masks_are_the_hand_table():
    windows = plan_windows(FRAMES, 4, 2)
    mask = _blend_mask(windows, [PinnedMask(k, recorded=k != 2) for k in range(4)])
    assert mask.shape == (FRAMES, 1, 1, 8)
    torch.testing.assert_close(mask[:, 0, 0], torch.tensor(BLENDED, dtype=mask.dtype), rtol=0, atol=1e-6)
    assert _blend_mask(windows, [PinnedMask(k, recorded=False) for k in range(4)]) is None
    one = PinnedMask(1).mask()
    assert _blend_mask(plan_windows(4, 4, 2), [PinnedMask(1)]).equal(one)


def test_edit_pairs_each_window_with_its_blend_recorder_and_holds_the_blended_outside(tmp_path, tiny,
                                                                                         monkeypatch):
    """The real edit loop over windows: window k's cross-attention maps reach recorder k only, and after the
    last step every latent column outside the blended mask of its frame is the source latent exactly."""
    steps = 3
    inv = fake_inversion(tiny, steps, FRAMES, (8, 8))
    inv.attrs["windows"] = plan_windows(FRAMES, 4, 2).describe()
    ws = make_workspace(tmp_path / "ws", frames=FRAMES, size=64)
    fake = FakeEditUNet(monkeypatch)
    made: list[Any] = []
    init = editing.LocalBlend.__init__

    def track(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.windows = set()
        made.append(self)

    def record(self: Any, p_edit: torch.Tensor, p_src: torch.Tensor) -> None:
        assert p_edit.shape[0] == 4  # one window's frames
        window = (len(fake.inputs) - 1) % len(SPANS)  # the windows run in order within a step
        if window != 2:  # window 2 records nothing: its mask is None
            self.windows.add(window)

    def mask(self: Any) -> torch.Tensor | None:
        if not self.windows:
            return None
        assert len(self.windows) == 1, self.windows
        (k,) = self.windows
        m = torch.zeros(4, 1, 8, 8)
        m[..., 2 * k:2 * k + 2] = 1  # window k's mask: latent columns 2k, 2k+1
        return m

    monkeypatch.setattr(editing.LocalBlend, "__init__", track)
    monkeypatch.setattr(editing.LocalBlend, "record", record)
    monkeypatch.setattr(editing.LocalBlend, "reset", lambda self: self.windows.clear())
    monkeypatch.setattr(editing.LocalBlend, "mask", mask)
    job = plan_edit(ws, inv, EditConfig(prompt="tiger", blend=["tiger"]))
    e, stats = edit_latents(ws, inv, tiny, job, Progress(quiet=True))

    assert len(made) == len(SPANS) and stats["windows"]["spans"] == [list(s) for s in SPANS]
    assert len(fake.inputs) == steps * len(SPANS)
    z0 = torch.from_numpy(inv.latents[0])
    inside = {f: set() for f in range(FRAMES)}  # the columns a window with a mask (not 2) covers
    for k, (s, e_) in enumerate(SPANS):
        if k != 2:
            for f in range(s, e_):
                inside[f] |= {2 * k, 2 * k + 1}
    for f in range(FRAMES):
        for col in range(8):
            same = torch.equal(e[f, ..., col], z0[f, ..., col])
            assert same == (col not in inside[f]), (f, col)
