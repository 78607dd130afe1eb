"""VideoGrain's layout modulation (stages.method.control.layout, ALGORITHM.md §13.3): the formula, the time
weight and the size regularisation with the numbers written out, and the handlers on a 4-slot batch: only
edit-cond changes, edit-uncond and the recon slots stay the plain attention bit for bit, SA-I / SA-II and a
P2P swap take precedence, the full-resolution self-attention is never modulated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.method.control.controller import AttentionController, attention_probs
from stages.method.control.editing import EditAttention, sa1_attention
from stages.method.control.layout import (LAYOUT_CROSS_STRENGTH, LAYOUT_SELF_STRENGTH, LAYOUT_STRENGTH, Layout,
                                          modulate, size_regularisation, time_weight)

FR, HEADS, D = 2, 2, 4
SELF_FULL = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # full latent resolution
SELF_HALF = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"  # half of it
SELF_UP = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"  # half, in a decoder (SA-II) block
CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
TIMESTEPS = [981, 701, 1]


# ----------------------------------------------------------------------------------------- the functions
def test_constants_are_videograins():
    assert (LAYOUT_CROSS_STRENGTH, LAYOUT_SELF_STRENGTH, LAYOUT_STRENGTH) == (1.0, 0.3, 1.0)


def test_modulate_a_2x3_score_matrix_by_hand():
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])
    positive = torch.tensor([[False, True, False], [True, False, False]])
    size_reg = torch.tensor([[0.5], [1.0]])
    # row 0: max 4, min 1, s w = 0.2: 1 - 0.2 (1 - 1) = 1; 2 + 0.2 (4 - 2) = 2.4; 4 - 0.2 (4 - 1) = 3.4
    # row 1: max 3, min -1, s w = 0.4: 0 + 0.4 (3 - 0) = 1.2; -1 - 0.4 (-1 + 1) = -1; 3 - 0.4 (3 + 1) = 1.4
    expect = torch.tensor([[1.0, 2.4, 3.4], [1.2, -1.0, 1.4]])
    torch.testing.assert_close(modulate(scores, positive, size_reg, 0.4), expect)
    torch.testing.assert_close(modulate(scores, positive, size_reg, 0.0), scores)
    # s w = 1: positives go to the row maximum, the rest to the row minimum
    full = modulate(scores, positive, torch.ones(2, 1), 1.0)
    torch.testing.assert_close(full, torch.tensor([[1.0, 4.0, 1.0], [3.0, -1.0, -1.0]]))
    # leading dims broadcast (heads), max/min stay per row
    batched = modulate(scores.expand(2, 3, 2, 3), positive[None, None], size_reg[None, None], 0.4)
    torch.testing.assert_close(batched, expect.expand(2, 3, 2, 3))


def test_time_weight_by_hand():
    assert time_weight(981) == pytest.approx(0.9039207968, abs=1e-10)  # 0.98 ** 5
    assert time_weight(701) == pytest.approx(0.16807, abs=1e-12)  # 0.7 ** 5
    assert time_weight(1) == 0.0
    assert time_weight(0) == 0.0  # vd's last step (t = 0): never negative


def test_size_regularisation_of_a_3x3_label_map():
    labels = torch.tensor([[[0, 1, 1],
                            [2, 1, 0],
                            [2, 2, 2]],
                           [[1, 1, 1],
                            [1, 1, 1],
                            [1, 1, 1]]])
    # frame 0: label 1 has 3 of 9 pixels -> 0.6667, label 2 has 4 -> 0.5556, label 0 (no region) -> 1
    # frame 1: label 1 covers the frame -> 0
    expect = torch.tensor([[[1.0, 0.6666667, 0.6666667],
                            [0.5555556, 0.6666667, 1.0],
                            [0.5555556, 0.5555556, 0.5555556]],
                           [[0.0] * 3] * 3])
    torch.testing.assert_close(size_regularisation(labels), expect)


def test_layout_layer_counts_the_background_as_a_region():
    labels = torch.tensor([[[0, 1, 1], [2, 1, 0], [2, 2, 2]]])
    lay = Layout(labels, [[5], []], TIMESTEPS, 2, 1.0, (3, 3))
    lab, s = lay.layer(9, torch.device("cpu"))
    assert torch.equal(lab, labels.flatten(1))
    # the background's 2 of 9 pixels: 1 - 2/9 = 0.7778 (not the 1 of "no region")
    torch.testing.assert_close(s[0, :, 0], torch.tensor([0.7777778, 0.6666667, 0.6666667, 0.5555556, 0.6666667,
                                                          0.7777778, 0.5555556, 0.5555556, 0.5555556]))
    assert [lay.active(i) for i in range(3)] == [True, True, False]
    assert lay.weight(0, LAYOUT_CROSS_STRENGTH) == pytest.approx(0.9039207968)
    assert Layout(labels, [[5], []], TIMESTEPS, 2, 2.0, (3, 3)).weight(1, LAYOUT_SELF_STRENGTH) == \
        pytest.approx(2.0 * 0.3 * 0.16807)
    assert not Layout(labels, [[5]], TIMESTEPS, 2, 0.0, (3, 3)).active(0)
    assert [lay.modulates_self(n) for n in (SELF_FULL, SELF_HALF, SELF_UP,
                                            "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
                                            "mid_block.attentions.0.transformer_blocks.0.attn1")] == \
        [False, True, True, False, True]


# ----------------------------------------------------------------------------------------- handlers
# latent 4x4; the self layers of SELF_HALF run at 2x2 = 4 tokens. Labels per frame at 4x4 (nearest to 2x2
# keeps the even rows/columns): frame 0: object 1 (edited, token 2) top-left, object 2 (unedited) right;
# frame 1: object 1 everywhere except one background pixel.
LABELS = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]],
                       [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]])
SMALL = torch.tensor([[1, 2, 0, 2], [1, 1, 1, 0]])  # (F, 4) labels at 2x2
SMALL_S = torch.tensor([[0.75, 0.5, 0.75, 0.5], [0.25, 0.25, 0.25, 0.75]])  # 1 - count / 4, background too


def qkv(n: int, keys: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(2 * torch.randn(4 * FR, HEADS, m, D, generator=g, dtype=dtype) for m in (n, keys, keys))


def make(layout: Layout | None, names=(SELF_FULL, SELF_HALF, SELF_UP, CROSS), step: int = 0, **kw):
    controller = AttentionController()
    controller.names = list(names)
    control = EditAttention(**{"sa1": False, "sa2": False, "cross": False, "layout": layout, **kw})
    installed = control.install(controller)
    controller.step = step
    return control, controller, installed


def layout(steps: int = 2, strength: float = 1.0) -> Layout:
    return Layout(LABELS, [[2], []], TIMESTEPS, steps, strength, (4, 4))


def expected_self(q, k, v, step, strength=1.0):
    """Edit-cond output by hand: same label (background included) positive, per frame."""
    q1, k1, v1 = (x[FR:2 * FR] for x in (q, k, v))
    scores = q1 @ k1.transpose(-1, -2) * D**-0.5
    positive = (SMALL[:, :, None] == SMALL[:, None, :])[:, None]
    w = strength * 0.3 * ((TIMESTEPS[step] - 1) / 1000) ** 5
    return modulate(scores, positive, SMALL_S[:, None, :, None], w).softmax(-1) @ v1


def expected_cross_probs(q, k, step, strength=1.0):
    """Edit-cond map by hand: token 2 positive at object 1's pixels only."""
    q1, k1 = q[FR:2 * FR], k[FR:2 * FR]
    scores = q1 @ k1.transpose(-1, -2) * D**-0.5
    positive = torch.zeros(FR, 1, 4, k.shape[2], dtype=torch.bool)
    positive[..., 2] = (SMALL == 1)[:, None, :]
    w = strength * 1.0 * ((TIMESTEPS[step] - 1) / 1000) ** 5
    return modulate(scores, positive, SMALL_S[:, None, :, None], w).softmax(-1)


def check_slots(out, plain, edit_cond):
    """Edit-uncond and both recon slots bit for bit the plain attention; edit-cond the hand value."""
    assert torch.equal(out[:FR], plain[:FR]), "edit-uncond changed"
    assert torch.equal(out[2 * FR:], plain[2 * FR:]), "a recon slot changed"
    torch.testing.assert_close(out[FR:2 * FR], edit_cond)


def test_self_attention_modulates_edit_cond_only_below_full_resolution():
    control, controller, installed = make(layout())
    assert installed["layout_self"] == [SELF_HALF, SELF_UP] and installed["layout"] == [CROSS]
    assert SELF_FULL not in controller.handlers  # the "64x64" layer keeps the fused attention
    q, k, v = qkv(4, 4)
    plain = F.scaled_dot_product_attention(q, k, v)
    for step in (0, 1):
        controller.step = step
        out = controller.handlers[SELF_HALF](SELF_HALF, None, q, k, v)
        check_slots(out, plain, expected_self(q, k, v, step))
        assert not torch.allclose(out[FR:2 * FR], plain[FR:2 * FR])
    controller.step = 2  # past the layout steps: everything plain
    assert torch.equal(controller.handlers[SELF_HALF](SELF_HALF, None, q, k, v), plain)
    assert control.usage["layout_self"] == 2 and control.usage["self_plain"] == 1
    # --layout-strength multiplies lambda
    _, strong, _ = make(layout(strength=3.0))
    check_slots(strong.handlers[SELF_HALF](SELF_HALF, None, q, k, v), plain, expected_self(q, k, v, 0, 3.0))


def test_a_mutant_that_modulates_recon_cond_fails_the_slot_check():
    """The check above can fail: the same modulation applied to recon-cond too is caught."""
    q, k, v = qkv(4, 4, seed=1)
    plain = F.scaled_dot_product_attention(q, k, v)
    edit = expected_self(q, k, v, 0)
    mutant = plain.clone()
    mutant[FR:2 * FR] = edit
    mutant[3 * FR:] = expected_self(*(torch.cat([x[:FR], x[3 * FR:], x[2 * FR:]]) for x in (q, k, v)), 0)
    check_slots(torch.cat([plain[:FR], edit, plain[2 * FR:]]), plain, edit)
    with pytest.raises(AssertionError, match="recon"):
        check_slots(mutant, plain, edit)
    uncond = plain.clone()  # and one that modulates edit-uncond
    uncond[:FR] = expected_self(*(torch.cat([x[FR:2 * FR], x[:FR], x[2 * FR:]]) for x in (q, k, v)), 0)
    uncond[FR:2 * FR] = edit
    with pytest.raises(AssertionError, match="edit-uncond"):
        check_slots(uncond, plain, edit)


def test_cross_attention_modulates_edit_cond_only():
    control, controller, _ = make(layout())
    q, k, v = qkv(4, 77, seed=2)
    plain = F.scaled_dot_product_attention(q, k, v)
    for step in (0, 1):
        controller.step = step
        out = controller.handlers[CROSS](CROSS, None, q, k, v)
        probs = expected_cross_probs(q, k, step)
        check_slots(out, plain, probs @ v[FR:2 * FR])
    # object 1's token gains mass at its own pixels; at step 0 (w = 0.904) it nearly takes the row there
    base = attention_probs(q[FR:2 * FR], k[FR:2 * FR])[..., 2]
    probs = expected_cross_probs(q, k, 0)[..., 2]
    inside = (SMALL == 1)[:, None, :].expand_as(probs)
    assert (probs[inside] > base[inside]).all()
    controller.step = 2
    assert torch.equal(controller.handlers[CROSS](CROSS, None, q, k, v), plain)
    assert control.usage["layout"] == 2


def test_cross_with_p2p_keeps_recon_slots_and_modulates_inserted_tokens_only():
    """Refine: inserted tokens (alpha 0) keep the modulated edit map, aligned ones take the source map."""
    mapper = torch.arange(77)
    alphas = torch.ones(77)
    alphas[2] = 0.0  # token 2 inserted
    kw = dict(cross=True, cross_steps=2, mapper=mapper, alphas=alphas, equalizer=torch.ones(77))
    q, k, v = qkv(4, 77, seed=3)
    _, with_layout, _ = make(layout(), **kw)
    _, without, _ = make(None, **kw)
    out = with_layout.handlers[CROSS](CROSS, None, q, k, v)
    ref = without.handlers[CROSS](CROSS, None, q, k, v)
    assert torch.equal(out[:FR], ref[:FR]) and torch.equal(out[2 * FR:], ref[2 * FR:])
    p3 = attention_probs(q[3 * FR:], k[3 * FR:])
    p1 = p3.clone()
    p1[..., 2] = expected_cross_probs(q, k, 0)[..., 2]
    torch.testing.assert_close(out[FR:2 * FR], p1 @ v[FR:2 * FR])


def test_a_p2p_swap_makes_the_cross_modulation_moot_and_it_is_skipped():
    kw = dict(cross=True, cross_steps=1, mapper=torch.arange(77), alphas=torch.ones(77), equalizer=torch.ones(77))
    q, k, v = qkv(4, 77, seed=4)
    control, with_layout, _ = make(layout(), **kw)
    _, without, _ = make(None, **kw)
    assert torch.equal(with_layout.handlers[CROSS](CROSS, None, q, k, v), without.handlers[CROSS](CROSS, None, q, k, v))
    assert control.usage["layout"] == 0 and control.usage["p2p"] == 1
    with_layout.step = without.step = 1  # after the P2P window the layout acts
    out = with_layout.handlers[CROSS](CROSS, None, q, k, v)
    check_slots(out, F.scaled_dot_product_attention(q, k, v), expected_cross_probs(q, k, 1) @ v[FR:2 * FR])


def test_sa1_and_sa2_take_precedence_over_the_self_modulation():
    from stages.method.control.editing import KeyMasks, sa2_attention

    hide = LABELS > 0
    kw = dict(sa1=True, sa2=True, sa1_steps=1, sa1_layers=(SELF_HALF,), key_masks=KeyMasks(hide, (4, 4)))
    controller = AttentionController()
    controller.names = [SELF_HALF, SELF_UP, "down_blocks.2.attentions.0.transformer_blocks.0.attn1"]
    control = EditAttention(cross=False, layout=layout(), **kw)
    control.install(controller)
    q, k, v = qkv(4, 4, seed=5)
    controller.step = 0  # SA-I in SELF_HALF
    assert torch.equal(controller.handlers[SELF_HALF](SELF_HALF, None, q, k, v), sa1_attention(q, k, v))
    controller.step = 1  # SA-II in the decoder block; the encoder layer is modulated
    mask = KeyMasks(hide, (4, 4)).for_tokens(4, q.device)
    assert torch.equal(controller.handlers[SELF_UP](SELF_UP, None, q, k, v), sa2_attention(q, k, v, mask))
    out = controller.handlers[SELF_HALF](SELF_HALF, None, q, k, v)
    check_slots(out, F.scaled_dot_product_attention(q, k, v), expected_self(q, k, v, 1))
    assert (control.usage["sa1"], control.usage["sa2"], control.usage["layout_self"]) == (1, 1, 1)


def test_frames_are_chunked_without_changing_the_result(monkeypatch):
    import stages.method.control.layout as layout_mod

    q, k, v = qkv(4, 4, seed=6)
    whole = layout().self_attention(q, k, v, 0)
    monkeypatch.setattr(layout_mod, "SCORE_BUDGET", HEADS * 4 * 4)  # one frame per chunk
    torch.testing.assert_close(layout().self_attention(q, k, v, 0), whole, rtol=0, atol=1e-6)
