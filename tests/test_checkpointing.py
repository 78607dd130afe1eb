"""--checkpointing: recomputed UNet blocks or layers give the same STDG gradient, null-text gradient and
inversion as `off`; the STDG recorders record each layer once; `auto` decides from the memory model;
preset/manifest key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_workspace
from stages.common.errors import UsageError
from stages.common.progress import Progress
from stages.invert import DEFAULT_STDG, STDG, InvertConfig, Passes, run_invert
from stages.invert.checkpointing import checkpointed, choose, unet_blocks, unet_layers, units
from stages.models import memory
from stages.models.oom import MemoryPlan

S, NULL = 3, 2
GIB = 1 << 30


def _cfg(**kw) -> InvertConfig:
    base = dict(prompt="a red disc on a textured wall", model="tiny", steps=S, null_steps=NULL, device="cpu")
    base.update(kw)
    return InvertConfig(**base)


@pytest.fixture
def setup(tiny, tmp_path):
    """(models, controller, z0 (1, F, 4, h, w), mask (F, H, W) bool, c_src (F, 77, D)) on a 4-frame clip."""
    from stages.method.control.controller import AttentionController, install
    from stages.models.ops import encode_text, vae_encode

    ws = make_workspace(tmp_path / "ws")
    z0 = vae_encode(tiny, ws.read("video/frames"))[None]
    mask = torch.from_numpy(ws.read("masks/edit").astype(bool))
    controller = install(tiny.unet, AttentionController())
    c_src = encode_text(tiny, ["a red disc"]).expand(4, -1, -1)
    yield tiny, controller, z0, mask, c_src
    controller.clear()


class _CountingDict(dict):
    """Counts every store: how often a recorder records."""

    def __init__(self) -> None:
        super().__init__()
        self.stores = 0

    def __setitem__(self, key, value) -> None:
        self.stores += 1
        super().__setitem__(key, value)


def test_the_units_of_each_level(tiny):
    """blocks: the 4 down, mid and 4 up blocks; layers: every resnet, spatial transformer, motion module and
    resampler inside them (the tiny UNet has SD1.5's layout: 2 layers per down block and 3 per up block, no
    spatial transformer in down_blocks.3 and up_blocks.0, no motion module in the mid block)."""
    unet = tiny.unet
    names = {id(m): n for n, m in unet.named_modules()}
    assert [names[id(b)] for b in units(unet, "blocks")] == [
        "down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
        "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    layers = [names[id(m)] for m in units(unet, "layers")]
    per_block = [2 + 2 + 2 + 1] * 3 + [2 + 2] + [2 + 1] + [3 + 3 + 1] + [3 + 3 + 3 + 1] * 2 + [3 + 3 + 3]
    assert len(layers) == len(set(layers)) == sum(per_block) == 64
    assert layers[:7] == ["down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.0.attentions.0",
                          "down_blocks.0.attentions.1", "down_blocks.0.motion_modules.0",
                          "down_blocks.0.motion_modules.1", "down_blocks.0.downsamplers.0"]
    assert layers[25:28] == ["mid_block.resnets.0", "mid_block.resnets.1", "mid_block.attentions.0"]
    assert layers[-1] == "up_blocks.3.motion_modules.2"
    assert units(unet, "off") == []
    with pytest.raises(ValueError, match="auto"):
        units(unet, "auto")


@pytest.mark.parametrize("level", ["blocks", "layers"])
def test_stdg_gradient_is_equal_and_each_layer_is_recorded_once(setup, monkeypatch, level):
    from stages.method import guidance
    from stages.method.control import record
    from stages.method.guidance import RegionMasks, needs_terms

    models, controller, z0, mask, c_src = setup
    coef = DEFAULT_STDG["foreground"]
    stdg = STDG(Passes(models), controller, RegionMasks(mask, tuple(z0.shape[-2:])), c_src, coef)
    targets = stdg.targets(z0, 501, needs_terms(coef))
    z_t = z0 + 0.1 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    layers = len(targets.temporal) + len(targets.keys)

    dicts: list[_CountingDict] = []
    reductions = [0]
    enter = record.Recorder.__enter__

    def counting_enter(self):
        out = enter(self)
        self.results = _CountingDict()
        dicts.append(self.results)
        return out

    def counted(fn):
        def run(*a, **k):
            reductions[0] += 1
            return fn(*a, **k)
        return run

    monkeypatch.setattr(record.Recorder, "__enter__", counting_enter)
    monkeypatch.setattr(guidance, "gather_top1", counted(guidance.gather_top1))
    monkeypatch.setattr(guidance, "masked_mean_keys", counted(guidance.masked_mean_keys))

    g_off, eps_off, loss_off, _ = stdg.gradient(z_t, 501, targets)
    assert dicts[-1].stores == layers and reductions[0] == layers
    reductions[0] = 0
    with checkpointed(models.unet, controller, level) as wrapped:
        g_on, eps_on, loss_on, _ = stdg.gradient(z_t, 501, targets)
    assert wrapped == len(units(models.unet, level)) > 0
    # the recomputation ran every recorded layer's reduction again (the graph needs it) but stored nothing
    assert reductions[0] == 2 * layers
    assert dicts[-1].stores == layers
    assert float(g_off.abs().max()) > 0
    assert torch.allclose(g_on, g_off, rtol=1e-5, atol=1e-6 * float(g_off.abs().max()))
    assert torch.equal(eps_on, eps_off) and loss_on == pytest.approx(loss_off, rel=1e-6)
    assert all("forward" not in vars(b) for b in units(models.unet, level))  # unwrapped afterwards
    assert not controller.recomputing and not controller.handlers


def test_windowed_null_text_gradient_is_equal(setup):
    """The null-text backward (here the windowed one: per-window graphs) gives the same phi gradient."""
    from stages.invert.nulltext import _null_text_backward_windowed
    from stages.method.ddim import make_schedule
    from stages.method.windows import plan_windows

    models, controller, z0, mask, c_src = setup
    passes = Passes(models, windows=plan_windows(4, 3, 1))
    sched = make_schedule("vd", 10)
    t, tp = sched.timesteps[3], sched.prev[3]
    with torch.no_grad():
        eps_c = passes.eps(z0, t, c_src)
    target = z0 * 0.9
    grads, losses = [], []
    for level in memory.LEVELS:
        phi = c_src[:1].clone().repeat(4, 1, 1).requires_grad_(True)
        with checkpointed(models.unet, controller, level) as n:
            losses.append(_null_text_backward_windowed(passes, z0, t, tp, phi, eps_c, torch.zeros_like(z0),
                                                       target, 7.5))
        assert n == len(units(models.unet, level))
        grads.append(phi.grad.clone())
    assert float(grads[0].abs().max()) > 0
    for grad, loss in zip(grads[1:], losses[1:]):
        assert torch.allclose(grad, grads[0], rtol=1e-5, atol=1e-6 * float(grads[0].abs().max()))
        assert float(losses[0]) == pytest.approx(float(loss), rel=1e-6)


def test_inversion_with_blocks_or_layers_equals_off_and_needs_no_restart(tiny, tmp_path):
    runs = {}
    for mode in memory.LEVELS:
        ws = make_workspace(tmp_path / mode)
        run_invert(ws, _cfg(checkpointing=mode), Progress(quiet=True), models=tiny)
        runs[mode] = ws
    for level in ("blocks", "layers"):  # the recomputation replays the same CPU kernels: bitwise equal
        for name in ("latents", "recon_latents", "null_embeddings", "stdg/guidance"):
            a, b = runs["off"].read(f"inversion/{name}"), runs[level].read(f"inversion/{name}")
            assert np.array_equal(a, b), (level, name, float(np.abs(a - b).max()))
    assert runs["layers"].group_attrs("inversion")["checkpointing"]["mode"] == "layers"
    assert float(np.abs(runs["off"].read("inversion/stdg/guidance")).max()) > 0  # STDG ran
    off, on = runs["off"].group_attrs("inversion"), runs["blocks"].group_attrs("inversion")
    assert off["checkpointing"]["mode"] == "off" and on["checkpointing"]["mode"] == "blocks"
    assert on["checkpointing"]["requested"] == "blocks"
    assert off["config_hash"] == on["config_hash"] and off["settings"] == on["settings"]
    # a finished inversion made with `off` is current for `blocks`: no --restart, nothing recomputed
    again = run_invert(runs["off"], _cfg(checkpointing="blocks"), Progress(quiet=True), models=tiny)
    assert again.get("already_done") is True
    # auto on the CPU: off, and the reason says so
    ws = make_workspace(tmp_path / "auto")
    run_invert(ws, _cfg(steps=2, null_steps=1), Progress(quiet=True), models=tiny)
    choice = ws.group_attrs("inversion")["checkpointing"]
    assert (choice["requested"], choice["mode"]) == ("auto", "off") and "CPU" in choice["reason"]
    assert all("forward" not in vars(b) for b in unet_blocks(tiny.unet) + unet_layers(tiny.unet))


TABLE = {"bf16": {"stdg": {"const": 2 * GIB, "per_frame": GIB}, "null_text": {"const": 3 * GIB, "per_frame": GIB},
                  "stdg+blocks": {"const": GIB, "per_frame": GIB // 8},
                  "null_text+blocks": {"const": GIB, "per_frame": GIB // 8},
                  "stdg+layers": {"const": GIB, "per_frame": GIB // 32},
                  "null_text+layers": {"const": GIB, "per_frame": GIB // 32}}}
WEIGHTS = {"unet": GIB // 2, "vae": 0, "text": 0}  # 1 GiB of bf16 UNet weights


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(memory, "COEFFICIENTS", TABLE)
    monkeypatch.setattr(memory, "WEIGHT_ELEMENTS", WEIGHTS)


def test_auto_picks_the_first_level_that_fits(table):
    plan = MemoryPlan("invert", 16, 512, 512, "bf16", window=16, model="sd15-animatediff-v3", device="cuda:0")
    need = 1 * GIB + 3 * GIB + 16 * GIB  # weights + the null-text pass at 16 frames per call
    assert choose("auto", plan, available=need + 1).mode == "off"
    assert choose("auto", plan, available=need - 1).mode == "blocks"
    tight = choose("auto", plan, available=need - GIB)
    assert tight.mode == "blocks" and (tight.need, tight.available) == (need, need - GIB)
    assert tight.reason == "auto: predicted 20.0 GiB > 19.0 GiB free; blocks 4.0 GiB fits"
    # blocks: 1 + 1 + 16/8 = 4 GiB; layers: 1 + 1 + 16/32 = 2.5 GiB
    assert choose("auto", plan, available=4 * GIB).mode == "blocks"
    assert choose("auto", plan, available=4 * GIB - 1).mode == "layers"
    squeezed = choose("auto", plan, available=2 * GIB)
    assert squeezed.mode == "layers" and squeezed.reason == ("auto: predicted 20.0 GiB > 2.0 GiB free, and 2.5 GiB "
                                                             "even with layers")
    assert choose("auto", MemoryPlan("invert", 24, 512, 512, "bf16", window=8, model="sd15-animatediff-v3",
                                     device="cuda:0"), available=need - GIB).mode == "off"  # 8 frames per call fit
    # a longer clip in windows of 16: the other 8 frames' state (trajectory, embedding, mask) counts too
    longer = choose("auto", MemoryPlan("invert", 24, 512, 512, "bf16", window=16, model="sd15-animatediff-v3",
                                       device="cuda:0"), available=need + 1)
    assert longer.mode == "blocks" and longer.need == need + 8 * (52 * 4 * 4096 * 4 + 77 * 768 * 4 + 512 * 512)
    assert choose("auto", plan.__class__(**{**plan.__dict__, "device": "cpu"}), available=0).mode == "off"
    assert choose("auto", plan.__class__(**{**plan.__dict__, "model": "tiny"}), available=0).mode == "off"
    assert choose("blocks", plan, available=10**15).mode == "blocks"
    assert choose("layers", plan, available=10**15).mode == "layers"
    assert choose("off", plan, available=0).mode == "off"
    with pytest.raises(ValueError, match="off, blocks, layers, auto"):
        choose("sometimes", plan)


def test_auto_looks_only_at_the_passes_the_method_backpropagates(table):
    """Negative prompt has no null-text pass (STDG: 1 + 2 + 16 = 19 GiB), direct inversion no backward at all."""
    from stages.invert.checkpointing import grad_passes, invert_plan

    null_text = invert_plan(InvertConfig(prompt="p", model="sd15-animatediff-v3", window=16), 16, 512, 512, "cuda:0", "bf16")
    negative = invert_plan(InvertConfig(prompt="p", model="sd15-animatediff-v3", window=16, method="negative-prompt"),
                           16, 512, 512, "cuda:0", "bf16")
    direct = InvertConfig(prompt="p", model="sd15-animatediff-v3", window=16, method="direct")
    assert (null_text.grad_passes, negative.grad_passes, grad_passes(direct)) == (("stdg", "null_text"), ("stdg",), ())
    available = 19 * GIB + 1  # the STDG pass fits, null text (1 + 3 + 16 = 20 GiB) does not
    assert choose("auto", null_text, available=available).mode == "blocks"
    assert choose("auto", negative, available=available).mode == "off"
    none = choose("auto", invert_plan(direct, 16, 512, 512, "cuda:0", "bf16"), available=0)
    assert none.mode == "off" and "nothing backpropagates" in none.reason


def test_auto_without_a_measured_table_stays_off(monkeypatch):
    monkeypatch.setattr(memory, "COEFFICIENTS", {"bf16": {}, "fp32": {}})
    plan = MemoryPlan("invert", 16, 512, 512, "bf16", window=16, model="sd15-animatediff-v3", device="cuda:0")
    choice = choose("auto", plan, available=1)
    assert choice.mode == "off" and "no memory prediction" in choice.reason


def test_flag_preset_and_manifest_key(tmp_path):
    from stages.batch.manifest import load_manifest
    from stages.common.config import build_config
    from stages.common.errors import InputError
    from stages.invert import validate
    from vdcli.app import app

    assert build_config(InvertConfig, {"checkpointing": "blocks"}).checkpointing == "blocks"
    assert build_config(InvertConfig, {"checkpointing": "layers"}).checkpointing == "layers"
    with pytest.raises(UsageError, match="--checkpointing must be one of off, blocks, layers, auto"):
        validate(_cfg(checkpointing="always"))
    (tmp_path / "m.yaml").write_text("defaults: {model: tiny, invert: {checkpointing: blocks}}\n"
                                     "clips:\n  - {clip: a.mp4, prompt: a dog, box: [1, 1, 9, 9]}\n")
    assert load_manifest(tmp_path / "m.yaml").clips[0].invert.checkpointing == "blocks"
    (tmp_path / "bad.yaml").write_text("clips:\n  - {clip: a.mp4, prompt: a dog, box: [1, 1, 9, 9], "
                                       "invert: {checkpointing: always}}\n")
    with pytest.raises(InputError, match="checkpointing"):
        load_manifest(tmp_path / "bad.yaml")
    ws = make_workspace(tmp_path / "ws")
    r = CliRunner().invoke(app, ["invert", str(ws.path), "--prompt", "a disc", "--checkpointing", "always"])
    assert r.exit_code == 2 and "--checkpointing must be one of" in r.stderr and "Traceback" not in r.output
