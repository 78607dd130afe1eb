"""`vd invert --method direct|negative-prompt` (issue 20; ALGORITHM.md §13.1-§13.2) and `vd edit` from them.

Golden values are written out here with the UNet stand-in eps = z/2 + t/1000 + mean(text embedding of the
frame) (tests/fake_unet.py), never taken from the code under test. The real tiny UNet checks what needs real
attention (the STDG targets, windows) and that nothing depends on the stand-in.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_workspace
from fake_unet import SOURCE, abar, fake_invert_eps, hand_ddim
from stages.common.errors import InputError, Interrupted
from stages.common.progress import Progress
from stages.edit.run import EditConfig, edit_latents, load_inversion_for_edit, plan_edit
from stages.invert import InvertConfig, is_current, resolve_config, run_invert
from vdcli.app import app

S = 4
PAIRS = {  # the edit grid (t, t_prev) per sampling step, where `vd edit` samples (ALGORITHM.md §1.5, §5.1)
    "vd": [(999, 666), (666, 333), (333, 0), (0, -1)],
    "reference": [(751, 501), (501, 251), (251, 1), (1, -249)],  # leading grid, t - 1000 // S
}
CONTROLS_OFF = dict(sa1=False, sa2=False, cross=False)  # and no blend (the default)


def _invert(ws, tiny, method: str, **kw):
    cfg = dict(prompt=SOURCE, subject="brown bear", model="tiny", steps=S, null_steps=2, use_stdg=False,
               device="cpu", method=method)
    cfg.update(kw)
    return run_invert(ws, InvertConfig(**cfg), Progress(quiet=True), models=tiny)


def _emb_mean(tiny, text: str) -> float:
    from stages.models.ops import encode_text

    return float(encode_text(tiny, [text]).double().mean())


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class Spy:
    """unet_eps stand-in that records every call's latents and embeddings (real tiny UNet or fake_invert_eps)."""

    def __init__(self, monkeypatch, fn=fake_invert_eps):
        import stages.models.ops

        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.fn = fn
        monkeypatch.setattr(stages.models.ops, "unet_eps", self)

    def __call__(self, models, z, t, emb):
        self.calls.append((t, z.detach().clone(), emb.detach().clone()))
        return self.fn(models, z, t, emb)


def _edit(ws, tiny, monkeypatch, **kw):
    """edit_latents with the edit's source branch object captured: (edit latent, stats, source branch)."""
    import stages.edit.sampling

    made = []
    real = stages.edit.sampling.source_branch

    def spy(inv, device):
        made.append(real(inv, device))
        return made[-1]

    monkeypatch.setattr(stages.edit.sampling, "source_branch", spy)
    inv = load_inversion_for_edit(ws)
    job = plan_edit(ws, inv, EditConfig(**kw))
    e, stats = edit_latents(ws, inv, tiny, job, Progress(quiet=True))
    return e, stats, made[0]


# ----------------------------------------------------------------------------------------- direct: inversion
@pytest.mark.parametrize("schedule", ["vd", "reference"])
def test_direct_offsets_per_step_by_hand(tiny, tmp_path, monkeypatch, schedule):
    """d_i = z*_{t_prev} - DDIM(z*_t, eps_c + 7.5 (eps_c - eps_u)) on the edit grid, eps_u from the plain
    unconditional (negative prompt "") embedding, eps_c from the source prompt; no optimisation, G = 0."""
    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    ws = make_workspace(tmp_path / "ws", frames=2)
    out = _invert(ws, tiny, "direct", schedule=schedule)
    lat = ws.read("inversion/latents").astype(np.float64)
    rec = ws.read("inversion/recon_latents").astype(np.float64)
    off = ws.read("inversion/direct_offsets").astype(np.float64)
    assert off.shape == (S,) + lat.shape[1:]
    m_u, m_c = _emb_mean(tiny, ""), _emb_mean(tiny, SOURCE)
    for i, (t, tp) in enumerate(PAIRS[schedule]):
        z, target = lat[S - i], lat[S - 1 - i]
        eps_u, eps_c = 0.5 * z + 1e-3 * t + m_u, 0.5 * z + 1e-3 * t + m_c
        e = eps_c + 7.5 * (eps_c - eps_u)
        x0 = (z - math.sqrt(1 - abar(t)) * e) / math.sqrt(abar(t))
        z_hat = math.sqrt(abar(tp)) * x0 + math.sqrt(1 - abar(tp)) * e
        tol = 2e-5 * max(1.0, np.abs(z_hat).max())
        assert np.abs(off[i] - (target - z_hat)).max() <= tol, i
        assert np.abs(rec[S - 1 - i] - (z_hat + off[i])).max() <= tol, i
    assert np.abs(off).max() > 0.1  # the plain step misses: the offsets carry information
    from stages.models.ops import encode_text

    neg = encode_text(tiny, [""])[0].numpy()
    null = ws.read("inversion/null_embeddings")
    assert all(np.array_equal(null[i, f], neg) for i in range(S) for f in range(2))  # the plain uncond
    assert not ws.read("inversion/stdg/guidance").any()  # STDG's inversion role skipped: G = 0
    assert out["method"] == "direct" and out["inner_iterations"] == [0] * S
    assert [p["forwards"] for p in out["per_step"]] == [2] * S and out["counts"]["null_text_total"]["backwards"] == 0


def _wild_eps(models, z, t, emb):
    """Not the stand-in's affine form: a steep nonlinearity of z, t and the text."""
    b, f = z.shape[:2]
    return 2.0 * torch.sin(3.0 * z) + torch.cos(z * t / 250.0) + 5.0 * emb.float().mean(dim=(1, 2)).view(b, f, 1, 1, 1)


@pytest.mark.parametrize("unet", ["fake", "wild"])
def test_direct_reconstruction_is_the_inversion_path_for_any_unet(tiny, tmp_path, monkeypatch, unet):
    """Whatever the UNet predicts, step + offset lands on z*_{t_prev} (the real tiny UNet: the next test)."""
    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps if unet == "fake" else _wild_eps)
    ws = make_workspace(tmp_path / "ws", frames=2)
    out = _invert(ws, tiny, "direct", steps=3)
    lat, rec = ws.read("inversion/latents"), ws.read("inversion/recon_latents")
    for k in range(4):
        assert _rel(rec[k], lat[k]) <= 1e-5, k
    recon = out["recon"]
    assert recon["latent_mse"] <= 1e-10 and recon["psnr"] == pytest.approx(recon["vae_psnr"], abs=0.01)


def _null_text_targets(tiny, ws, frames: int, spans: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
    """Per step, the STDG targets as the null-text step records them (STDG.targets on z*_t where
    nulltext._step runs it, 0 < i < S-1 here), named like the workspace's (w<k>/ per window when several)."""
    from stages.invert.passes import Passes
    from stages.invert.stdg import STDG
    from stages.method.control.controller import AttentionController, install
    from stages.method.ddim import make_schedule
    from stages.method.guidance import RegionMasks
    from stages.models.ops import encode_text

    lat = torch.from_numpy(ws.read("inversion/latents"))
    fg = torch.from_numpy(ws.read("masks/edit").astype(bool))
    c_src = encode_text(tiny, [SOURCE]).expand(frames, -1, -1)
    steps = 3
    sched = make_schedule("vd", steps)
    controller = install(tiny.unet, AttentionController())
    out: list[dict[str, np.ndarray]] = []
    try:
        for i in range(steps):
            found: dict[str, np.ndarray] = {}
            for k, (s, e) in enumerate(spans if 0 < i < steps - 1 else []):
                stdg = STDG(Passes(tiny), controller, RegionMasks(fg[s:e], tuple(lat.shape[3:])), c_src[s:e],
                            (0.5, 0.5, 0.0, 0.5))
                tg = stdg.targets(lat[steps - i][None, s:e], sched.timesteps[i])
                root = f"w{k}/" if len(spans) > 1 else ""
                for name, (value, index) in tg.temporal.items():
                    found[f"{root}temporal/{name}/value"] = value.numpy().astype(np.float16)
                    found[f"{root}temporal/{name}/index"] = index.numpy().astype(np.uint8)
                for name, keys in tg.keys.items():
                    found[f"{root}keys/{name}"] = keys.numpy()
            out.append(found)
    finally:
        controller.clear()
    return out


@pytest.mark.parametrize("frames, window", [(2, 16), (3, 2)])
def test_direct_with_the_real_unet_records_the_null_text_targets_and_its_edit_lands_on_the_path(
        tiny, tmp_path, monkeypatch, frames, window):
    """Real tiny UNet, STDG on (default coefficients), one window and two. The reconstruction is the inversion
    path; the STDG targets are, bit for bit, those the null-text step records (same steps, same statistics);
    an edit with every control on feeds its recon slots z*_t up to rounding (the edit's batch-4 predictions
    under attention control differ from the inversion's in the last bits, amplified by 1/sqrt(a_t) at t=999)."""
    import stages.models.ops

    ws = make_workspace(tmp_path / "ws", frames=frames)
    _invert(ws, tiny, "direct", steps=3, use_stdg=True, window=window, overlap=1)
    lat, rec = ws.read("inversion/latents"), ws.read("inversion/recon_latents")
    for k in range(4):
        assert _rel(rec[k], lat[k]) <= 1e-5, k
    spans = [(0, frames)] if window >= frames else [(0, 2), (1, 3)]
    want = _null_text_targets(tiny, ws, frames, spans)
    names = set().union(*(w.keys() for w in want))
    assert names and any(n.startswith("w1/") for n in names) == (len(spans) == 2)
    for name in names:
        stored = ws.read(f"inversion/targets/{name}")
        for i in range(3):
            if name in want[i]:
                assert np.array_equal(stored[i], want[i][name]), (name, i)
            else:
                assert not stored[i].any(), (name, i)  # skipped steps stay zero, as with null text
    if len(spans) == 1:
        return
    spy = Spy(monkeypatch, stages.models.ops.unet_eps)
    _e, stats, source = _edit(ws, tiny, monkeypatch, prompt="tiger")
    assert stats["calls"]["sa1"] > 0 and stats["calls"]["p2p"] > 0 and len(stats["windows"]["spans"]) == 2
    off = ws.read("inversion/direct_offsets")
    for i in range(3):
        first, second = spy.calls[2 * i][1], spy.calls[2 * i + 1][1]  # windows (0, 2) and (1, 3)
        fed = torch.cat([first[2], second[2][-1:]])
        assert torch.equal(fed, torch.cat([first[3], second[3][-1:]]))
        assert _rel(fed, lat[3 - i]) <= 1e-3, i
    assert _rel(source.latent, lat[0]) <= 1e-3
    assert np.abs(off).max() > 50 * 1e-3 * np.abs(lat).max()  # the offsets move the plain step 50x that much


# ----------------------------------------------------------------------------------------- direct: editing
def test_direct_edit_source_branch_reproduces_the_reconstruction_and_the_target_branch_is_plain(
        tiny, tmp_path, monkeypatch):
    """Every control off, the source prompt as target. The source branch (recon slots) gets the offsets and
    reproduces the reconstruction (the inversion path); the target branch never does: it is the plain CFG
    DDIM path from z*_T, written out here, and does not reproduce it."""
    ws = make_workspace(tmp_path / "ws", frames=2)
    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    _invert(ws, tiny, "direct")
    spy = Spy(monkeypatch)
    e_final, stats, source = _edit(ws, tiny, monkeypatch, prompt=SOURCE, **CONTROLS_OFF)
    assert stats["installed"] == {"sa1": 0, "sa2": 0, "cross": 0, "blend": 0}
    lat = ws.read("inversion/latents")
    rec = ws.read("inversion/recon_latents")
    assert len(spy.calls) == S
    for i, (_t, z, _emb) in enumerate(spy.calls):
        assert _rel(z[2], lat[S - i]) <= 1e-5 and _rel(z[3], lat[S - i]) <= 1e-5, i
    assert _rel(source.latent, rec[0]) <= 1e-5 and _rel(source.latent, lat[0]) <= 1e-5

    m_u, m_c = _emb_mean(tiny, ""), _emb_mean(tiny, SOURCE)
    e = torch.from_numpy(lat[S]).double()
    for t, tp in PAIRS["vd"]:
        eps_u, eps_c = 0.5 * e + 1e-3 * t + m_u, 0.5 * e + 1e-3 * t + m_c
        e = hand_ddim(e, eps_c + 7.5 * (eps_c - eps_u), t, tp)
    torch.testing.assert_close(e_final.double(), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
    assert _rel(e_final, rec[0]) > 1e-2  # without the offsets the target branch leaves the path


# ----------------------------------------------------------------------------------------- negative prompt
def test_negative_prompt_null_embedding_is_the_source_prompts(tiny, tmp_path, monkeypatch):
    """phi_i = emb(source prompt) for every step and frame, no Adam iteration; the reconstruction step is then
    the conditional-only DDIM step (eps_c + 7.5 (eps_c - eps_c)); vd edit's uncond slot gets emb(source)."""
    from stages.models.ops import encode_text

    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    ws = make_workspace(tmp_path / "ws", frames=2)
    out = _invert(ws, tiny, "negative-prompt")
    src = encode_text(tiny, [SOURCE])[0]
    null = ws.read("inversion/null_embeddings")
    assert all(np.array_equal(null[i, f], src.numpy()) for i in range(S) for f in range(2))
    assert out["inner_iterations"] == [0] * S and out["counts"]["null_text_total"]["backwards"] == 0
    rec = ws.read("inversion/recon_latents").astype(np.float64)
    m_c = _emb_mean(tiny, SOURCE)
    for i, (t, tp) in enumerate(PAIRS["vd"]):
        z = rec[S - i]
        eps = 0.5 * z + 1e-3 * t + m_c  # both halves of CFG are the source prompt's
        want = math.sqrt(abar(tp)) * (z - math.sqrt(1 - abar(t)) * eps) / math.sqrt(abar(t)) \
            + math.sqrt(1 - abar(tp)) * eps
        assert np.abs(rec[S - 1 - i] - want).max() <= 2e-5 * max(1.0, np.abs(want).max()), i
    spy = Spy(monkeypatch)
    _e, _stats, source = _edit(ws, tiny, monkeypatch, prompt="tiger", **CONTROLS_OFF)
    assert source is None  # no offsets: the recon slots get the stored z*
    for _t, _z, emb in spy.calls:
        assert torch.equal(emb[:2], src.expand(2, -1, -1))  # edit-uncond slot: the source prompt


# ----------------------------------------------------------------------------------------- settings, CLI, batch, eval
def test_method_is_a_stored_setting_carried_on_resume_and_refused_when_changed(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    ws = make_workspace(tmp_path / "ws", frames=2)
    _invert(ws, tiny, "direct")
    attrs = ws.group_attrs("inversion")
    assert attrs["method"] == "direct" and attrs["settings"]["method"] == "direct"
    assert resolve_config(ws, {}).method == "direct"  # `vd invert WS` resumes with the stored method
    base = dict(prompt=SOURCE, subject="brown bear", model="tiny", steps=S, use_stdg=False)
    assert is_current(ws, InvertConfig(method="direct", null_steps=7, **base)) == (True, "")  # null steps unused
    with pytest.raises(InputError, match=r"method 'direct' -> 'null-text'.*--restart"):
        run_invert(ws, InvertConfig(method="null-text", **base), Progress(quiet=True), models=None)
    # an inversion made before --method existed is a null-text one
    old = make_workspace(tmp_path / "old", frames=2)
    _invert(old, tiny, "null-text", null_steps=1)
    settings = dict(old.group_attrs("inversion")["settings"])
    del settings["method"]
    old.update_attrs("inversion", settings=settings)
    assert is_current(old, InvertConfig(null_steps=1, **base)) == (True, "")
    assert "method 'null-text' -> 'direct'" in is_current(old, InvertConfig(method="direct", **base))[1]
    from stages.batch.resume import invert_action

    identity = settings["model_fingerprint"]
    assert invert_action(old, InvertConfig(null_steps=1, **base), identity) == ("skip", "")
    done = old.read("inversion/done")
    done[2:] = False
    old.write_array("inversion/done", done)  # unfinished: vd batch resumes it, or restarts for another method
    assert invert_action(old, InvertConfig(null_steps=1, **base), identity)[0] == "resume"
    assert invert_action(old, InvertConfig(method="direct", **base), identity)[0] == "restart"


def test_interrupted_direct_inversion_resumes_to_the_same_arrays(tiny, tmp_path, monkeypatch, interrupt_invert):
    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    ref = make_workspace(tmp_path / "ref", frames=2)
    ws = make_workspace(tmp_path / "ws", frames=2)
    with pytest.raises(Interrupted):
        _invert(ws, tiny, "direct")
    done = ws.read("inversion/done")
    assert done[0] and not done[1:].any()
    assert _invert(ws, tiny, "direct")["resumed_from"] == 1
    _invert(ref, tiny, "direct")
    for name in ("latents", "recon_latents", "direct_offsets", "null_embeddings", "stdg/guidance"):
        assert np.array_equal(ws.read(f"inversion/{name}"), ref.read(f"inversion/{name}")), name


def test_cli_method_option_refusals_and_info(tiny, tmp_path, monkeypatch, loads):
    runner = CliRunner()
    ws = make_workspace(tmp_path / "ws", frames=2)
    fast = ["--prompt", SOURCE, "--model", "tiny", "--steps", "3", "--device", "cpu", "--no-stdg", "-q"]
    for extra, text in ((["--method", "bogus"], "--method must be one of null-text, direct, negative-prompt"),
                        (["--method", "direct", "--plain"], "--plain is the reference-cost baseline")):
        res = runner.invoke(app, ["invert", str(ws.path), *fast, *extra])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and text in lines[0], res.stderr
    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    res = runner.invoke(app, ["invert", str(ws.path), *fast, "--method", "direct", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "direct"
    info = runner.invoke(app, ["info", str(ws.path)])
    assert info.exit_code == 0 and "method direct" in info.stdout
    check = runner.invoke(app, ["info", str(ws.path), "--check", "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout)["check"]["ok"] is True


def test_batch_manifest_takes_method_in_the_invert_section_and_as_a_key(tmp_path):
    from stages.batch.manifest import validate_manifest

    clip = {"clip": "a.mp4", "prompt": "a red disc", "box": "10,10,100,100"}
    plans = validate_manifest({"clips": [{**clip, "invert": {"method": "direct"}},
                                         {**clip, "name": "b", "method": "negative-prompt"}, {**clip, "name": "c"}]},
                              tmp_path / "m.yaml").clips
    assert [p.invert.method for p in plans] == ["direct", "negative-prompt", "null-text"]
    with pytest.raises(InputError, match=r"clips\[0\].*--method must be one of"):
        validate_manifest({"clips": [{**clip, "method": "ddim"}]}, tmp_path / "m.yaml")


def test_eval_compare_tables_methods_side_by_side(tmp_path):
    from stages.evaluate import EvalConfig, compare

    for k, (method, psnr) in enumerate((("null-text", 20.0), ("direct", 30.0), ("direct", 29.0),
                                        ("negative-prompt", 15.0))):
        ws = make_workspace(tmp_path / "clips" / f"c{k}", frames=2, seed=k)
        src = ws.read("video/frames")
        noise = np.random.default_rng(k).normal(0, 2 + 4 * (method != "direct"), src.shape)
        ws.write_array("inversion/reconstruction", np.clip(src + noise, 0, 255).astype(np.uint8))
        ws.update_attrs("inversion", method=method, recon={"psnr": psnr, "vae_psnr": 30.0},
                        timings={"total_s": 10.0 if method == "null-text" else 2.0 + k})
    out = compare([tmp_path / "clips"], EvalConfig(metrics=["psnr"]))
    methods = out["methods"]
    assert list(methods) == ["null-text", "direct", "negative-prompt"]
    direct = methods["direct"]
    assert len(direct["clips"]) == 2 and direct["inversion"]["metrics"]["below_vae_db"] == pytest.approx(0.5)
    assert direct["inversion"]["metrics"]["invert_s"] == pytest.approx(3.5)
    assert direct["groups"]["reconstruction"]["n"] == 2
    assert methods["null-text"]["inversion"]["metrics"]["below_vae_db"] == pytest.approx(10.0)
    shutil.rmtree(tmp_path / "clips" / "c3" / "eval", ignore_errors=True)
    res = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path / "clips"), "--metrics", "psnr", "-q"])
    assert res.exit_code == 0, res.output
    assert "By inversion method" in res.stdout and "direct n=2" in res.stdout and "null-text n=1" in res.stdout


@pytest.mark.parametrize("method, uncond", [("negative-prompt", SOURCE), ("direct", ""), ("null-text", "")],
                         ids=["negative-prompt", "direct", "null-text"])
def test_recon_uncond_slot_follows_the_inversion_method(tiny, tmp_path, monkeypatch, method, uncond):
    """The text of the recon-uncond slot (2). negative-prompt: the source prompt's, as PnP's NPI+P2P gives both
    rows the same uncond c_src; the recon branch's CFG prediction is then eps_c + 7.5 (eps_c - eps_c) = eps_c,
    the inversion path's own. direct: the negative prompt "" its offsets were made with (the source branch lands
    on z* only so). null-text: the negative prompt, not phi (the reference code, ALGORITHM.md §5.1)."""
    from stages.method.ddim import cfg as cfg_combine
    from stages.models.ops import encode_text

    monkeypatch.setattr("stages.models.ops.unet_eps", fake_invert_eps)
    ws = make_workspace(tmp_path / "ws", frames=2)
    _invert(ws, tiny, method, null_steps=1)
    spy = Spy(monkeypatch)
    _edit(ws, tiny, monkeypatch, prompt="tiger", **CONTROLS_OFF)
    want, src = encode_text(tiny, [uncond, SOURCE])
    null = torch.from_numpy(ws.read("inversion/null_embeddings"))
    m_u, m_c = _emb_mean(tiny, uncond), _emb_mean(tiny, SOURCE)
    assert len(spy.calls) == S
    for i, (t, z, emb) in enumerate(spy.calls):
        slot = emb.view(4, 2, *emb.shape[1:])  # rows slot * F + frame
        assert torch.equal(slot[2], want.expand(2, -1, -1)) and torch.equal(slot[3], src.expand(2, -1, -1)), i
        assert torch.equal(slot[0], null[i])  # edit-uncond: the stored phi_i, whatever the method
        eps = fake_invert_eps(tiny, z, t, emb)
        recon = cfg_combine(eps[2], eps[3], 7.5).double()
        by_hand = 0.5 * z[3].double() + 1e-3 * t + m_c + 7.5 * (m_c - m_u)  # eps_c + 7.5 (m_c - m_u)
        torch.testing.assert_close(recon, by_hand, rtol=1e-5, atol=1e-5)
        if method == "negative-prompt":
            assert torch.equal(eps[2], eps[3])  # slot 2 is slot 3: the recon prediction is eps_c exactly
    if method != "negative-prompt":
        assert abs(m_c - m_u) > 1e-3  # the negative prompt differs from the source: the slot is told apart
