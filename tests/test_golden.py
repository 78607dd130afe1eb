"""Golden values from ALGORITHM.md (§1.5-1.7, §3.6, §4, §5), written out in the test, never obtained by
calling the function under test: ᾱ table, grids and prev rules, CFG form, the STDG DDIM step, the
inversion and null-text update paths, the null-text learning rate and early stop, and the edit's step
ranges and update. Stage paths run the real stage code with a UNet stand-in (tests/fake_unet.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_workspace
from fake_unet import SOURCE, FakeEditUNet, abar, fake_invert_eps, fake_inversion, hand_ddim
from stages.method import ddim
from stages.method.control.editing import LocalBlend
from stages.edit.run import EditConfig, edit_latents, plan_edit
from stages.invert import InvertConfig, run_invert
from stages.common.progress import Progress

# ALGORITHM.md §1.5, verbatim
LINSPACE_50 = [999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734, 714, 693, 673, 652, 632, 612,
               591, 571, 550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224, 204,
               183, 163, 143, 122, 102, 82, 61, 41, 20, 0]
LEADING_50 = list(range(981, 0, -20))  # 981, 961, ..., 21, 1
LINSPACE_10 = [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
LEADING_10 = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


# ----------------------------------------------------------------------------------------- pure math
def test_alpha_bar_table_is_animatediffs_linear_schedule():
    assert abar(999) == pytest.approx(0.0015790, rel=5e-5)  # the test's own formula agrees with the doc
    for t, want, rel in ((999, 0.0015790, 5e-5), (981, 0.0019588, 5e-5), (0, 0.99915, 1e-6), (1, 0.99829, 5e-6)):
        assert ddim.alpha_bar(t) == pytest.approx(want, rel=rel), t
    assert ddim.alpha_bar(-1) == 1.0 and ddim.alpha_bar(-19) == 1.0  # set_alpha_to_one
    # SD's scaled_linear schedule would give ᾱ_999 = 0.0046: the linear one is 3x smaller
    assert ddim.alpha_bar(999) < 0.002


def test_cfg_is_the_reference_form_not_diffusers():
    eps_u = torch.tensor([0.2, -1.0, 0.5], dtype=torch.float64)
    eps_c = torch.tensor([0.6, 1.0, 0.5], dtype=torch.float64)
    # eps_c + 7.5 (eps_c - eps_u) by hand; diffusers' eps_u + 7.5 (eps_c - eps_u) would be 3.2, 14.0, 0.5
    want = torch.tensor([0.6 + 7.5 * 0.4, 1.0 + 7.5 * 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(ddim.cfg(eps_u, eps_c, 7.5), want, rtol=0, atol=1e-12)
    assert InvertConfig().cfg == 7.5


def test_one_ddim_step_with_stdg_and_cfg_by_hand():
    z = [0.5, -1.25, 2.0, 0.0]
    eu = [0.1, 0.3, -0.2, 1.0]
    ec = [0.3, 0.2, -0.1, 0.4]
    g = [1.0, -2.0, 0.5, 3.0]
    t, tp = 999, 979
    a_t, a_p = abar(999), abar(979)
    expected = []
    for zi, ui, ci, gi in zip(z, eu, ec, g):
        e = ci + 7.5 * (ci - ui)
        x0 = (zi - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)  # un-guided eps in x0
        expected.append(math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * (e - 1.0 * math.sqrt(1 - a_t) * gi))
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = ddim.ddim_step(as_t(z), ddim.cfg(as_t(eu), as_t(ec), 7.5), t, tp, guidance=as_t(g), guidance_scale=1.0)
    torch.testing.assert_close(got, as_t(expected), rtol=1e-9, atol=1e-9)
    plain = ddim.ddim_step(as_t(z), ddim.cfg(as_t(eu), as_t(ec), 7.5), t, tp)
    # net effect -sqrt(1-a_p) sqrt(1-a_t) G: one descent step on the STDG losses (sign pinned)
    torch.testing.assert_close(got - plain, -math.sqrt(1 - a_p) * math.sqrt(1 - a_t) * as_t(g), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t, coefficient, tol", [(999, 0.998, 5e-4), (500, 0.83, 5e-3), (102, 0.118, 5e-4),
                                                 (20, 0.004, 5e-4), (0, 0.0, 0.0)])
def test_stdg_coefficient_table_of_algorithm_md(t, coefficient, tol):
    """§3.6: with prev = t - 20 the step moves z by -c G, c = 0.998, 0.83, 0.118, 0.004, 0."""
    z = torch.tensor([0.3, -0.7], dtype=torch.float64)
    eps = torch.tensor([1.1, 0.2], dtype=torch.float64)
    g = torch.tensor([1.0, -1.0], dtype=torch.float64)
    moved = ddim.ddim_step(z, eps, t, t - 20, guidance=g) - ddim.ddim_step(z, eps, t, t - 20)
    assert float(moved[0]) == pytest.approx(-coefficient, abs=tol)
    assert float(moved[1]) == pytest.approx(coefficient, abs=tol)
    assert ddim.guidance_coefficient(t, t - 20) == pytest.approx(coefficient, abs=tol)
    assert ddim.guidance_coefficient(t, t - 20) == pytest.approx(
        math.sqrt(1 - abar(t - 20)) * math.sqrt(1 - abar(t)), rel=1e-12, abs=1e-15)


def test_schedule_defaults_names_and_limits():
    assert ddim.make_schedule() == ddim.make_schedule("vd", 50) and ddim.make_schedule().name == "vd"
    assert list(ddim.make_schedule().timesteps) == LINSPACE_50
    assert ddim.make_schedule("reference", 50).name == "reference"
    assert list(ddim.make_schedule("vd", 2).timesteps) == [999, 0] and ddim.make_schedule("vd", 1000).steps == 1000
    for bad in (1, 1001):
        with pytest.raises(ValueError, match=f"steps must be in 2..1000, got {bad}"):
            ddim.make_schedule("vd", bad)
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose from vd, reference"):
        ddim.make_schedule("linear", 10)
    # diffusers' leading spacing uses the integer ratio 1000 // S: 142 at S = 7 (not 142.86)
    assert list(ddim.make_schedule("reference", 7).edit_timesteps) == [853, 711, 569, 427, 285, 143, 1]
    assert list(ddim.make_schedule("reference", 7).prev) == [999 - 142, 832 - 142, 666 - 142, 500 - 142,
                                                             333 - 142, 166 - 142, 0 - 142]


def test_inverse_step_by_hand():
    z, eps = 0.7, -0.4
    a_cur, a_next = abar(20), abar(41)
    want = math.sqrt(a_next) * (z - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur) + math.sqrt(1 - a_next) * eps
    got = ddim.ddim_inverse_step(torch.tensor([z], dtype=torch.float64), torch.tensor([eps], dtype=torch.float64),
                                 20, 41)
    assert float(got[0]) == pytest.approx(want, rel=1e-12)
    # from the clean latent (prev < 0: ᾱ = 1) the step is a forward noising
    got0 = ddim.ddim_inverse_step(torch.tensor([z], dtype=torch.float64), torch.tensor([eps], dtype=torch.float64),
                                  -1, 0)
    assert float(got0[0]) == pytest.approx(math.sqrt(0.99915) * z + math.sqrt(1 - 0.99915) * eps, rel=1e-12)


@pytest.mark.parametrize("steps, grid, leading", [(50, LINSPACE_50, LEADING_50), (10, LINSPACE_10, LEADING_10)])
def test_both_schedules_grids_and_prev_rules(steps, grid, leading):
    vd = ddim.make_schedule("vd", steps)
    assert list(vd.timesteps) == grid and list(vd.edit_timesteps) == grid
    assert list(vd.prev) == grid[1:] + [-1] and list(vd.edit_prev) == grid[1:] + [-1]  # true previous
    ref = ddim.make_schedule("reference", steps)
    ratio = {50: 20, 10: 100}[steps]  # 1000 // S
    assert list(ref.timesteps) == grid and list(ref.edit_timesteps) == leading
    assert list(ref.prev) == [t - ratio for t in grid] and list(ref.edit_prev) == [t - ratio for t in leading]
    if steps == 50:  # the t-20 rule ignores the 20/21 alternation: 979 -> 959, not 958
        assert ref.prev[:3] == (979, 959, 938) and vd.prev[:3] == (979, 958, 938)
        assert ref.edit_prev[-1] == -19 and ref.prev[-1] == -20


# ----------------------------------------------------------------------------------------- invert
def _invert_fake(ws, tiny, monkeypatch, **kw):
    import stages.models.ops

    monkeypatch.setattr(stages.models.ops, "unet_eps", fake_invert_eps)
    cfg = dict(prompt=SOURCE, subject="brown bear", model="tiny", steps=4, null_steps=2, use_stdg=False, device="cpu")
    cfg.update(kw)
    return run_invert(ws, InvertConfig(**cfg), Progress(quiet=True), models=tiny)


@pytest.mark.parametrize("schedule, inversion_pairs, sampling_pairs", [
    ("vd", [(-1, 0), (0, 333), (333, 666), (666, 999)], [(999, 666), (666, 333), (333, 0), (0, -1)]),
    ("reference", [(-250, 0), (83, 333), (416, 666), (749, 999)], [(999, 749), (666, 416), (333, 83), (0, -250)]),
])
def test_inversion_and_null_text_update_by_hand(tiny, tmp_path, monkeypatch, schedule, inversion_pairs,
                                                sampling_pairs):
    """ALGORITHM.md §1.7 and §4 with eps = z/2 + t/1000 + mean(text embedding of the frame)."""
    from stages.models.ops import encode_text

    ws = make_workspace(tmp_path / "ws", frames=2)
    _invert_fake(ws, tiny, monkeypatch, schedule=schedule)
    lat = ws.read("inversion/latents").astype(np.float64)
    rec = ws.read("inversion/recon_latents").astype(np.float64)
    null = ws.read("inversion/null_embeddings").astype(np.float64)
    m_c = float(encode_text(tiny, [SOURCE]).double().mean())
    S = 4

    def close(got, want):
        assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max())

    for k, (tp, t) in enumerate(inversion_pairs):  # ascending; conditional only
        z = lat[k]
        eps = 0.5 * z + 1e-3 * t + m_c
        want = math.sqrt(abar(t)) * (z - math.sqrt(1 - abar(tp)) * eps) / math.sqrt(abar(tp)) \
            + math.sqrt(1 - abar(t)) * eps
        close(lat[k + 1], want)
    assert np.array_equal(rec[S], lat[S])  # the reconstruction starts at z*_T
    for i, (t, tp) in enumerate(sampling_pairs):
        z = rec[S - i]
        m_u = null[i].mean(axis=(1, 2)).reshape(-1, 1, 1, 1)  # per-frame null text
        eps_u, eps_c = 0.5 * z + 1e-3 * t + m_u, 0.5 * z + 1e-3 * t + m_c
        e = eps_c + 7.5 * (eps_c - eps_u)
        x0 = (z - math.sqrt(1 - abar(t)) * e) / math.sqrt(abar(t))
        close(rec[S - 1 - i], math.sqrt(abar(tp)) * x0 + math.sqrt(1 - abar(tp)) * e)


def test_null_text_learning_rate_and_early_stop(tiny, tmp_path, monkeypatch):
    """lr = 0.01 (1 - i / 2S) with a fresh Adam per step; stop once the loss (before the update) is
    below 1e-5 + i * 2e-5. The losses are scripted: step i stops at its (1 + i % 3)-th iteration."""
    lrs: list[float] = []
    iters: list[int] = []
    real_adam, real_mse = torch.optim.Adam, torch.nn.functional.mse_loss

    class SpyAdam(real_adam):
        def __init__(self, params, lr=1e-3, **kw):
            lrs.append(float(lr))
            iters.append(0)
            super().__init__(params, lr=lr, **kw)

    def threshold(i: int) -> float:
        return 1e-5 + i * 2e-5

    def scripted(a, b, *args, **kw):
        i = len(lrs) - 1
        j = iters[i]
        iters[i] += 1
        value = threshold(i) * (0.98 if j == i % 3 else 1.02)
        return real_mse(a, b) * 0 + torch.tensor(value, dtype=torch.float64)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    monkeypatch.setattr(torch.nn.functional, "mse_loss", scripted)
    out = _invert_fake(make_workspace(tmp_path / "ws10", frames=2), tiny, monkeypatch, steps=10, null_steps=3)
    assert lrs == pytest.approx([0.01, 0.0095, 0.009, 0.0085, 0.008, 0.0075, 0.007, 0.0065, 0.006, 0.0055],
                                rel=1e-12)
    assert out["inner_iterations"] == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    assert [p["null_loss"] for p in out["per_step"]] == pytest.approx([0.98 * threshold(i) for i in range(10)])
    assert threshold(0) == 1e-5 and threshold(9) == pytest.approx(1.9e-4)

    lrs.clear()
    iters.clear()
    monkeypatch.setattr(torch.nn.functional, "mse_loss", real_mse)
    _invert_fake(make_workspace(tmp_path / "ws50", frames=2), tiny, monkeypatch, steps=50, null_steps=1)
    assert len(lrs) == 50 and lrs[0] == pytest.approx(0.01) and lrs[25] == pytest.approx(0.0075)
    assert lrs[49] == pytest.approx(0.0051)  # ALGORITHM.md §4: 0.01 at i = 0 down to 0.0051 at i = 49


# ----------------------------------------------------------------------------------------- edit
@pytest.fixture
def half_ws(tmp_path):
    ws = make_workspace(tmp_path / "ws", frames=2, size=64)
    mask = np.zeros((2, 64, 64), np.uint8)
    mask[:, :, :32] = 1
    ws.write_array("masks/edit", mask)
    return ws


def _edit(ws, tiny, inv, **kw):
    job = plan_edit(ws, inv, EditConfig(prompt="tiger", **kw))
    return edit_latents(ws, inv, tiny, job, Progress(quiet=True))


@pytest.mark.parametrize("steps, tau_s, sa1_until, p2p_until", [
    (4, 0.4, 1, 4),     # int(1.6) = 1 (not round); int(0.8 * 5) = 4 (int(0.8 * 4) would be 3)
    (10, 0.4, 4, 8),    # int(0.8 * 11) = 8
    (50, 0.4, 20, 40),  # bear: SA-I 0-19, SA-II 20-49, P2P 0-39 (§5.4 timeline)
    (50, 0.3, 15, 40),  # blackswan: T_s = 15
])
def test_edit_step_ranges_for_p2p_sa1_and_sa2(half_ws, tiny, monkeypatch, steps, tau_s, sa1_until, p2p_until):
    fake = FakeEditUNet(monkeypatch)
    inv = fake_inversion(tiny, steps, 2, (8, 8))
    _, stats = _edit(half_ws, tiny, inv, tau_s=tau_s)
    assert fake.steps_of["sa1_attention"] == set(range(sa1_until))
    assert fake.steps_of["sa2_attention"] == set(range(sa1_until, steps))
    assert fake.steps_of["p2p_maps"] == set(range(p2p_until))
    assert stats["sa1_steps"] == sa1_until and stats["cross_steps"] == p2p_until


@pytest.mark.parametrize("schedule, pairs", [
    ("vd", [(999, 666), (666, 333), (333, 0), (0, -1)]),
    ("reference", [(751, 501), (501, 251), (251, 1), (1, -249)]),  # leading grid, t - 1000 // S
])
def test_edit_update_step_by_hand(half_ws, tiny, monkeypatch, schedule, pairs):
    """§5.1: slots [e(phi_i), e(target), z*(neg), z*(src)]; e <- DDIM(eps_1 + 7.5 (eps_1 - eps_0), G_i)."""
    from stages.models.ops import encode_text

    fake = FakeEditUNet(monkeypatch)
    inv = fake_inversion(tiny, 4, 2, (8, 8), schedule=schedule, guidance_scale=0.05)
    e_final, _ = _edit(half_ws, tiny, inv)
    lat = torch.from_numpy(inv.latents).double()
    tgt, src, neg = encode_text(tiny, [SOURCE.replace("brown bear", "tiger"), SOURCE, ""])
    e = lat[4].clone()
    for i, (t, tp) in enumerate(pairs):
        t_in, z_in, emb = fake.inputs[i]
        assert t_in == t
        torch.testing.assert_close(z_in[0].double(), e, rtol=1e-5, atol=1e-5)
        assert torch.equal(z_in[1], z_in[0]) and torch.equal(z_in[2], torch.from_numpy(inv.latents[4 - i]))
        assert torch.equal(z_in[3], z_in[2])
        assert torch.equal(emb[:2], torch.from_numpy(inv.null_embeddings[i]))
        for slot, want in ((1, tgt), (2, neg), (3, src)):
            assert torch.equal(emb[2 * slot:2 * slot + 2], want.expand(2, -1, -1)), slot
        eps_u = 0.5 * e + 1e-3 * t + 0.1  # FakeEditUNet.SLOT[0]
        eps_c = 0.5 * e + 1e-3 * t + 0.3  # FakeEditUNet.SLOT[1]
        e = hand_ddim(e, eps_c + 7.5 * (eps_c - eps_u), t, tp, torch.from_numpy(inv.guidance[i]).double())
    torch.testing.assert_close(e_final.double(), e, rtol=1e-5, atol=1e-5)


def test_local_blend_threshold_by_hand():
    """Normalised word map > 0.3 after a 3x3 max-pool, union over source and target words."""
    lb = LocalBlend(src_pos=[1], tgt_pos=[2], latent_hw=(8, 8), threshold=EditConfig().blend_threshold)
    src = torch.zeros(1, 1, 64, 77)
    src[0, 0, 0 * 8 + 0, 1] = 1.0    # peak at (0, 0)
    src[0, 0, 7 * 8 + 7, 1] = 0.31   # just above 0.3 of the peak at (7, 7)
    src[0, 0, 7 * 8 + 0, 1] = 0.29   # just below at (7, 0)
    tgt = torch.zeros(1, 1, 64, 77)
    tgt[0, 0, 0 * 8 + 7, 2] = 0.5    # the target word's own peak at (0, 7)
    lb.record(tgt, src)
    want = torch.zeros(8, 8)
    want[0:2, 0:2] = 1  # 3x3 max-pool spreads each kept pixel to its neighbours (clipped at the border)
    want[6:8, 6:8] = 1
    want[0:2, 6:8] = 1
    assert torch.equal(lb.mask()[0, 0], want)
    assert EditConfig().blend_start == 0.2
