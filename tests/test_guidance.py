"""STDG: masks, compact targets, losses, recording handlers and the gradient (tiny model, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.method import guidance as g
from stages.method.control.controller import AttentionController, install
from stages.method.control.record import Recorder, StopForward, cut_graph_after, stdg_layers

T1 = "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1"
T2 = "up_blocks.2.motion_modules.1.transformer_blocks.0.attn2"
K1 = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
K2 = "up_blocks.2.attentions.2.transformer_blocks.0.attn1"


def _maps(hw: int, heads: int, f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hw, heads, f, f, generator=gen, dtype=torch.float64).mul(2).softmax(-1)


# ------------------------------------------------------------------------------------------ pure parts

def test_top1_targets_give_the_same_loss_as_the_full_map_formulation():
    ref, gen = _maps(6, 2, 4, 0), _maps(6, 2, 4, 1)
    select = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.5
    value, index = g.temporal_top1(ref)
    assert torch.equal(index, ref.argmax(-1))
    compact = g.temporal_mse(g.gather_top1(gen, index), value, select)
    full = g.temporal_mse_full(gen, ref, select)
    assert compact.item() > 0
    assert compact.item() == pytest.approx(full.item(), rel=1e-12)


def test_empty_region_gives_zero_loss_and_zero_gradient_not_nan():
    ref, gen = _maps(4, 2, 3, 0), _maps(4, 2, 3, 1).requires_grad_(True)
    value, index = g.temporal_top1(ref)
    loss = g.temporal_mse(g.gather_top1(gen, index), value, torch.zeros(3, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(gen.grad).any() and gen.grad.abs().max() == 0
    keys = torch.randn(3, 4, 5)
    means = g.masked_mean_keys(keys, torch.zeros(2, 3, 4, dtype=torch.bool))
    assert torch.equal(means, torch.zeros(2, 3, 5))


def test_masked_mean_keys_is_the_per_frame_region_average():
    keys = torch.randn(3, 6, 5, dtype=torch.float64)
    regions = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    out = g.masked_mean_keys(keys, regions)
    for r in range(2):
        for f in range(3):
            m = regions[r, f]
            expect = keys[f][m].sum(0) / (m.sum() + 1e-5)
            assert torch.allclose(out[r, f], expect)


def test_masks_resize_with_pytorch_nearest_from_full_resolution():
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    small = g.resize_mask(mask, (4, 4))
    assert torch.equal(small, mask[:, ::4, ::4])  # floor(k * 16 / 4): the top-left sample of each cell
    regions = g.RegionMasks(mask, (16, 16))
    fg, bg = regions.tokens(16)
    assert torch.equal(fg, mask[:, ::4, ::4].flatten(1)) and torch.equal(bg, ~fg)


def test_layer_grid_follows_the_unet_downsampling():
    assert g.layer_grid(4, 8, 8) == (2, 2)
    assert g.layer_grid(8, 8, 16) == (2, 4)
    assert g.layer_grid(6, 9, 5) == (3, 2)  # ceil halving: 9x5 -> 5x3 -> 3x2
    with pytest.raises(ValueError):
        g.layer_grid(7, 8, 8)


def test_losses_use_block_weights_and_layer_means():
    f, heads = 2, 2
    regions = g.RegionMasks(torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]]], dtype=torch.bool), (2, 2))
    ref = g.Targets(temporal={T1: g.temporal_top1(_maps(4, heads, f, 0)), T2: g.temporal_top1(_maps(4, heads, f, 1))},
                    keys={K1: torch.randn(2, f, 3, dtype=torch.float64), K2: torch.randn(2, f, 3, dtype=torch.float64)})
    gen = g.Generated(temporal={n: g.gather_top1(_maps(4, heads, f, 5 + i), ref.temporal[n][1])
                                for i, n in enumerate(ref.temporal)},
                      keys={n: torch.randn(2, f, 3, dtype=torch.float64) for n in ref.keys})
    losses = g.stdg_losses(gen, ref, regions)
    fg = regions.tokens(4)[0]
    t_fg = (20000 * g.temporal_mse(gen.temporal[T1], ref.temporal[T1][0], fg)
            + 10000 * g.temporal_mse(gen.temporal[T2], ref.temporal[T2][0], fg)) / 2
    k_bg = (20000 * ((gen.keys[K1][1] - ref.keys[K1][1]) ** 2).mean()
            + 10000 * ((gen.keys[K2][1] - ref.keys[K2][1]) ** 2).mean()) / 2
    assert losses["T_fg"].item() == pytest.approx(t_fg.item())
    assert losses["K_bg"].item() == pytest.approx(k_bg.item())
    total = g.combine({**losses, "K_fg": torch.tensor(float("nan"))}, (0.5, 0.5, 0.0, 0.5))
    assert math.isfinite(total.item())  # zero-coefficient terms are skipped, not multiplied by 0


def test_parse_coefficients_rejects_malformed_values():
    assert g.parse_coefficients("0.5,0.5,0,0.5") == (0.5, 0.5, 0.0, 0.5)
    for bad in ("0.5,0.5,0", "a,b,c,d", "0.5,0.5,0,-1", "nan,0,0,0"):
        with pytest.raises(ValueError):
            g.parse_coefficients(bad)


# ------------------------------------------------------------------------------- with the tiny model

@pytest.fixture(scope="module")
def models():
    from stages.models.load import load_models

    return load_models("tiny", device="cpu")


@pytest.fixture(scope="module")
def controller(models):
    return install(models.unet, AttentionController())


def _ins(models, frames=4, seed=0, dtype=torch.float32):
    from stages.models.ops import encode_text

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, frames, 4, 8, 8, generator=gen).to(dtype)
    emb = encode_text(models, ["a red disc"]).expand(frames, -1, -1).to(dtype)
    return z, emb


def test_stdg_layers_are_found_by_name(controller):
    temporal, spatial = stdg_layers(controller.names)
    assert len(temporal) == 12 and len(spatial) == 6
    assert all(".motion_modules." in n and n.startswith(("up_blocks.1.", "up_blocks.2.")) for n in temporal)
    assert all(n.endswith("attn1") and ".attentions." in n for n in spatial)


def test_recording_keeps_the_unet_output_and_truncation_stops_after_the_last_layer(models, controller):
    from stages.models.ops import unet_eps

    temporal, spatial = stdg_layers(controller.names)
    z, emb = _ins(models)
    with torch.no_grad():
        plain = unet_eps(models, z, 500, emb)
        rec = Recorder(controller, temporal, spatial, lambda n, p: g.temporal_top1(p), lambda n, k: k.shape)
        with rec:
            recorded = unet_eps(models, z, 500, emb)
        assert torch.allclose(plain, recorded, atol=1e-5)
        heads = {int(v[0].shape[1]) for v in (rec.results[n] for n in temporal)}
        rows = sorted({int(rec.results[n][0].shape[0]) for n in temporal})
        assert rows == [4, 16] and heads == {8}  # 2x2 and 4x4 token grids of an 8x8 latent
        assert all(rec.results[n][1].max() < 4 for n in temporal)
        assert all(rec.results[n][0] == 4 for n in spatial)  # (B*F, HW, C)
        stop = Recorder(controller, temporal, spatial, lambda n, p: 0, lambda n, k: 0, stop_when_complete=True)
        with stop, pytest.raises(StopForward):
            unet_eps(models, z, 500, emb)
        assert stop.complete and controller.handlers == {}


def test_temporal_rows_and_spatial_tokens_are_row_major_positions(models, controller):
    """Changing one spatial position changes exactly the rows/tokens p = y * W + x (norms bypassed)."""
    mm = models.unet.up_blocks[1].motion_modules[0]
    st = models.unet.up_blocks[1].attentions[0]
    norms = mm.norm, st.norm
    try:  # GroupNorm mixes positions; the layout question is only about the reshapes
        mm.norm, st.norm = torch.nn.Identity(), torch.nn.Identity()
        _check_layout(models, controller, mm, st)
    finally:
        mm.norm, st.norm = norms


def _check_layout(models, controller, mm, st):
    name = "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1"
    x = torch.randn(4, mm.in_channels, 2, 3)
    x2 = x.clone()
    x2[:, :, 1, 0] += 1.0  # position (y=1, x=0) of every frame -> p = 3
    rec = Recorder(controller, [name], [], lambda n, p: p, None)
    with torch.no_grad(), rec:
        mm(x, num_frames=4)
        a = rec.results[name]
        mm(x2, num_frames=4)
        b = rec.results[name]
    changed = (a - b).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert changed.tolist() == [p == 3 for p in range(6)]

    sname = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    h = torch.randn(4, st.in_channels, 2, 3)
    h2 = h.clone()
    h2[2, :, 0, 2] += 1.0  # frame 2, position (0, 2) -> token 2
    enc = torch.randn(4, 77, models.text_dim)
    rec = Recorder(controller, [], [sname], None, lambda n, k: k)
    with torch.no_grad(), rec:
        st(h, encoder_hidden_states=enc)
        a = rec.results[sname]
        st(h2, encoder_hidden_states=enc)
        b = rec.results[sname]
    changed = (a - b).abs().amax(dim=-1) > 1e-6  # (F, HW)
    expect = torch.zeros(4, 6, dtype=torch.bool)
    expect[2, 2] = True
    assert torch.equal(changed, expect)


def test_stdg_gradient_matches_finite_differences_and_the_sum_of_components(models, controller):
    from stages.invert import STDG, Passes

    models.unet.double()
    try:
        z_star, emb = _ins(models, seed=1, dtype=torch.float64)
        z = z_star + 0.3 * torch.randn(z_star.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        mask = torch.zeros(4, 64, 64, dtype=torch.bool)
        mask[:, 16:48, 8:40] = True
        coef = (0.5, 0.7, 0.3, 0.5)
        stdg = STDG(Passes(models), controller, g.RegionMasks(mask, (8, 8)), emb, coef)
        targets = stdg.targets(z_star, 600)
        G, eps_c, losses, comps = stdg.gradient(z, 600, targets, g.COMPONENTS)
        assert G.dtype == torch.float64 and G.abs().max() > 0 and all(v > 0 for v in losses.values())
        summed = sum(c * comps[n] for n, c in zip(g.COMPONENTS, coef))
        assert torch.allclose(G, summed, rtol=1e-9, atol=1e-12)

        direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        h = 1e-4

        def total(zz):
            _, _, ls, _ = stdg.gradient(zz, 600, targets)
            return sum(c * ls[n] for n, c in zip(g.COMPONENTS, coef))

        fd = (total(z + h * direction) - total(z - h * direction)) / (2 * h)
        assert (G * direction).sum().item() == pytest.approx(fd, rel=1e-5)

        # the graph cut after up_blocks.2 changes neither the gradient nor eps_c
        G2, eps2, _, _ = stdg.gradient(z, 600, targets, cut=False)
        assert torch.allclose(G, G2, rtol=1e-10, atol=1e-14) and torch.allclose(eps_c, eps2)
        # at z == z*, the generated features equal the targets: G is exactly zero (why step 0 is skipped)
        G0, _, losses0, _ = stdg.gradient(z_star, 600, targets)
        assert G0.abs().max().item() == 0.0 and all(v == 0.0 for v in losses0.values())
    finally:
        models.unet.float()


def test_cut_graph_after_leaves_the_output_unchanged(models):
    from stages.models.ops import unet_eps

    z, emb = _ins(models, seed=4)
    z.requires_grad_(True)
    with cut_graph_after(models.unet):
        out = unet_eps(models, z, 300, emb)
    assert not out.requires_grad  # nothing after up_blocks.2 is in the graph
    with torch.no_grad():
        assert torch.allclose(out, unet_eps(models, z, 300, emb), atol=1e-6)
