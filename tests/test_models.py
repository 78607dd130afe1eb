"""stages.models (load, ops, patches, formats, catalog, status, tokenizer) / `vd models`: tiny model, tokenizer ids,
shapes, per-frame GroupNorm, the caches, and the real loading paths exercised on tiny checkpoints written in the
real on-disk formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.common.cache import vd_cache
from stages.common.errors import InputError, ModelMissingError, UsageError
from stages.io.synthetic import moving_disc
from stages.models import catalog, configs, formats, ops, patches, random_specs, status
from stages.models.load import load_models
from stages.models.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

import model_files


@pytest.fixture(scope="module")
def tiny() -> ops.Models:
    return load_models("tiny")


@pytest.fixture(scope="module")
def tiny_parts():
    """The un-assembled tiny components (unet2d, adapter, vae, text) as load_models builds them."""
    return random_specs.build_random("tiny", configs.TINY_SEED)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_gives_sd15_ids():
    tok = clip_tokenizer()
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids[:7] == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert len(ids) == 77 and set(ids[7:]) == {EOS_ID}
    assert len(tok) == VOCAB_SIZE
    # punctuation and case are split / folded like CLIP
    assert tok("A Cat,")["input_ids"] == [BOS_ID, 320, 2368, 267, EOS_ID]
    long = tok(["word " * 200], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(long) == 77 and long[-1] == EOS_ID


# ------------------------------------------------------------------------------------------- tiny spec

def test_tiny_is_deterministic_and_frozen(tiny):
    again = load_models("tiny")
    _assert_same_weights(tiny.unet, again.unet)
    _assert_same_weights(tiny.vae, again.vae)
    _assert_same_weights(tiny.text_encoder, again.text_encoder)
    assert tiny.fingerprint == again.fingerprint and tiny.fingerprint.startswith("tiny-0-")
    other = load_models("tiny", seed=1)
    assert other.fingerprint != tiny.fingerprint
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)
    for model in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32
    assert tiny.text_encoder.config.vocab_size == VOCAB_SIZE
    assert tiny.max_frames == 32
    # SD1.5 module names, motion modules everywhere except the mid block
    names = dict(tiny.unet.named_modules())
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1" in names
    assert "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1" in names
    assert not any(n.startswith("mid_block.motion_modules") for n in names)
    assert len(patches.motion_norms(tiny.unet)) == 4 * 2 + 4 * 3
    # the taming: perturbed norm affines, non-zero motion proj_out
    assert not torch.allclose(tiny.unet.conv_norm_out.weight, torch.ones_like(tiny.unet.conv_norm_out.weight))
    assert tiny.unet.up_blocks[1].motion_modules[0].proj_out.weight.abs().mean() > 1e-3


def test_shapes_and_dtypes(tiny):
    emb = ops.encode_text(tiny, ["a photo of a cat", ""])
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    video, _ = moving_disc(4, 64, 64, seed=0)
    z = ops.vae_encode(tiny, video)
    assert z.shape == (4, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(z, ops.vae_encode(tiny, video, seed=42))
    assert not torch.equal(z, ops.vae_encode(tiny, video, seed=7))  # a posterior sample, not the mode
    frames = ops.vae_decode(tiny, z)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    cond = emb[:1].repeat(8, 1, 1)
    eps = ops.unet_eps(tiny, torch.stack([z, z + 0.1]), 500, cond)
    assert eps.shape == (2, 4, 4, 8, 8) and eps.dtype == torch.float32
    assert 0.2 < eps.std().item() < 3.0  # O(1), not exploded
    with pytest.raises(InputError):
        ops.vae_encode(tiny, video.astype(np.float32))


def test_vae_encode_in_chunks_is_the_one_batch_posterior_sample(tiny):
    """Chunks of 4 frames (4 + 2 here), each converted on its own, give the one-batch encode's moments and
    one noise draw for the whole clip (ALGORITHM.md §1.3)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    video, _ = moving_disc(6, 64, 64, seed=1)
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        moments = tiny.vae.encode(x).latent_dist.parameters
    sample = DiagonalGaussianDistribution(moments).sample(generator=torch.Generator().manual_seed(42))
    expected = sample * 0.18215
    assert torch.allclose(ops.vae_encode(tiny, video, seed=42, chunk=4), expected, atol=1e-5, rtol=1e-5)


def test_unet_eps_rows_are_batch_major_and_gradients_flow(tiny):
    torch.manual_seed(0)
    z = torch.randn(2, 4, 4, 8, 8)
    emb = ops.encode_text(tiny, ["a red car", "a blue bird", ""])
    rows = torch.cat([emb[0:1].repeat(4, 1, 1), emb[1:2].repeat(4, 1, 1)])
    both = ops.unet_eps(tiny, z, 300, rows)
    second = ops.unet_eps(tiny, z[1:], 300, rows[4:])
    assert torch.allclose(both[1:], second, atol=1e-5)
    null = emb[2:3].repeat(4, 1, 1).clone().requires_grad_(True)
    ops.unet_eps(tiny, z[:1], 300, null).square().mean().backward()
    assert null.grad is not None and null.grad.abs().sum() > 0


def test_cfg_does_not_explode(tiny):
    from stages.method.ddim import cfg, ddim_step, make_schedule

    emb = ops.encode_text(tiny, ["a majestic red dragon flying over snowy mountains", ""])
    cond, uncond = emb[0:1].repeat(4, 1, 1), emb[1:2].repeat(4, 1, 1)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 4, 8, 8)
    sched = make_schedule("vd", 50)
    eu, ec = ops.unet_eps(tiny, z, sched.timesteps[10], uncond), ops.unet_eps(tiny, z, sched.timesteps[10], cond)
    rel = ((ec - eu).norm() / eu.norm()).item()
    assert 1e-4 < rel < 0.1  # the text matters, but CFG x8.5 stays a perturbation
    plain = guided = z
    for i in range(10, 13):
        t, tp = sched.timesteps[i], sched.prev[i]
        eps_u = ops.unet_eps(tiny, guided, t, uncond)
        guided = ddim_step(guided, cfg(eps_u, ops.unet_eps(tiny, guided, t, cond), 7.5), t, tp)
        plain = ddim_step(plain, ops.unet_eps(tiny, plain, t, uncond), t, tp)
    assert torch.isfinite(guided).all()
    assert guided.std() < 2 * plain.std()


# --------------------------------------------------------------------------------- per-frame GroupNorm

def test_per_frame_groupnorm_switch(tiny):
    unet = tiny.unet
    mm = unet.up_blocks[1].motion_modules[0]
    c = mm.in_channels
    torch.manual_seed(0)
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0]).repeat(2).view(8, 1, 1, 1)
    x = torch.randn(8, c, 8, 8) * scale + torch.arange(8.0).view(8, 1, 1, 1)
    spatial = unet.up_blocks[1].attentions[0]
    emb = torch.randn(8, 77, 32)
    try:
        patches.set_per_frame_groupnorm(unet, True)
        per_frame = mm(x, num_frames=4)
        one_frame_a = mm(x[:2], num_frames=1)
        spatial_a = spatial(x, encoder_hidden_states=emb).sample
        patches.set_per_frame_groupnorm(unet, False)
        across = mm(x, num_frames=4)
        one_frame_b = mm(x[:2], num_frames=1)
        spatial_b = spatial(x, encoder_hidden_states=emb).sample
    finally:
        patches.set_per_frame_groupnorm(unet, True)
    assert (per_frame - across).abs().max() > 1e-2  # frames with different stats: the switch matters
    assert torch.equal(one_frame_a, one_frame_b)  # one frame: both conventions are the same
    assert torch.equal(spatial_a, spatial_b)  # spatial modules untouched
    # per-frame means exactly GroupNorm on each frame separately
    norm = mm.norm
    y = x.view(2, 4, c, 8, 8).permute(0, 2, 1, 3, 4)
    ref = torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    assert torch.allclose(norm(y), ref.view(2, 4, c, 8, 8).permute(0, 2, 1, 3, 4), atol=1e-5)
    # only the motion-module norms were re-classed
    classed = [n for n, m in unet.named_modules() if isinstance(m, patches.PerFrameGroupNorm)]
    assert classed and all(".motion_modules." in n for n in classed)


def test_load_models_switch_changes_unet_output(tiny):
    across = load_models("tiny", per_frame_groupnorm=False)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 4, 8, 8) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1, 1)
    emb = ops.encode_text(tiny, [""]).repeat(4, 1, 1)
    assert not torch.allclose(ops.unet_eps(tiny, z, 400, emb), ops.unet_eps(across, z, 400, emb), atol=1e-4)
    assert torch.allclose(ops.unet_eps(tiny, z[:, :1], 400, emb[:1]), ops.unet_eps(across, z[:, :1], 400, emb[:1]),
                          atol=1e-5)


# ------------------------------------------------------------------- real loading paths on tiny weights

def _write_sd15_folder(root: Path, tiny_parts) -> Path:
    return model_files.write_config_folder(root, tiny_parts)


def test_diffusers_folder_and_adapter_folder(tmp_path, tiny_parts, tiny):
    folder = _write_sd15_folder(tmp_path / "sd15", tiny_parts)
    tiny_parts[1].save_pretrained(tmp_path / "adapter")
    m = load_models(str(folder), motion_adapter=tmp_path / "adapter")
    _assert_same_weights(m.unet, tiny.unet)
    _assert_same_weights(m.vae, tiny.vae)
    _assert_same_weights(m.text_encoder, tiny.text_encoder)
    assert m.tokenizer("a photo of a cat").input_ids[:3] == [BOS_ID, 320, 1125]
    assert m.fingerprint.startswith("sd15-animatediff-")
    # VD_SD15 + the default spec take the same path and give the same fingerprint
    m2 = load_models("sd15-animatediff-v3", sd15=folder, motion_adapter=tmp_path / "adapter")
    assert m2.fingerprint == m.fingerprint
    shutil.copytree(folder, tmp_path / "moved")  # same weights elsewhere: same fingerprint
    assert load_models(str(tmp_path / "moved"), motion_adapter=tmp_path / "adapter").fingerprint == m.fingerprint


def test_hub_cache_branch(tmp_path, tiny_parts, monkeypatch):
    folder = _write_sd15_folder(tmp_path / "sd15", tiny_parts)
    tiny_parts[1].save_pretrained(tmp_path / "adapter")
    snapshots = {catalog.SD15_REPO: folder, catalog.ADAPTER_REPO: tmp_path / "adapter"}
    monkeypatch.setattr(catalog, "hub_snapshot", lambda repo, need=(): snapshots.get(repo))
    for var in ("VD_SD15", "VD_MOTION_ADAPTER"):
        monkeypatch.delenv(var, raising=False)
    m = load_models("sd15-animatediff-v3")
    assert m.sources == {"sd15": f"hub:{catalog.SD15_REPO}", "motion_adapter": f"hub:{catalog.ADAPTER_REPO}"}
    report = status.models_status()
    assert report["specs"]["sd15-animatediff-v3"]
    # a different weight file -> a different fingerprint
    random_specs.build_random("tiny", 1)[0].save_pretrained(folder / "unet")
    assert load_models("sd15-animatediff-v3").fingerprint != m.fingerprint


def test_single_file_checkpoint_and_original_motion_module(tmp_path, tiny_parts, tiny):
    from safetensors.torch import save_file

    config_dir = _write_sd15_folder(tmp_path / "cfg", tiny_parts)
    single = model_files.write_single_file(tmp_path / "tinyVision.safetensors", tiny_parts)
    # original AnimateDiff v3 layout, saved with torch.save; non-motion keys are ignored
    mm = model_files.write_original_motion_module(tmp_path / "v3_tiny_mm.ckpt", tiny_parts,
                                                  extra={"unrelated.weight": torch.zeros(1)})
    original = model_files.original_motion_state(tiny_parts[1])
    config = formats.adapter_config_from_state_dict(formats.convert_original_motion_module(original))
    assert config["block_out_channels"] == [32, 32, 64, 64]

    m = load_models(str(single), motion_adapter=mm, sd15_config=config_dir)
    _assert_same_weights(m.unet, tiny.unet)
    _assert_same_weights(m.vae, tiny.vae)
    _assert_same_weights(m.text_encoder, tiny.text_encoder)
    assert m.sources["sd15"] == str(single)
    video, _ = moving_disc(4, 64, 64, seed=1)
    assert torch.equal(ops.vae_encode(m, video), ops.vae_encode(tiny, video))

    # a checkpoint that is not SD1.5
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(InputError):
        load_models(str(bad), motion_adapter=mm, sd15_config=config_dir)


def test_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(catalog, "hub_snapshot", lambda repo, need=(): None)
    monkeypatch.delenv("VD_SD15", raising=False)
    monkeypatch.delenv("VD_MOTION_ADAPTER", raising=False)
    with pytest.raises(ModelMissingError, match="hf download") as info:
        load_models("sd15-animatediff-v3")
    assert info.value.exit_code == 4 and "\n" not in str(info.value)
    with pytest.raises(ModelMissingError):
        load_models(str(tmp_path / "nope.safetensors"))
    with pytest.raises(UsageError):
        load_models("sd15")  # a typo, not a path
    monkeypatch.setenv("VD_SD15", str(tmp_path / "nowhere"))
    with pytest.raises(ModelMissingError, match="VD_SD15"):
        load_models("sd15-animatediff-v3")


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_models_json(tmp_path, monkeypatch, tiny_parts):
    from typer.testing import CliRunner

    from vdcli.app import app

    monkeypatch.setattr(catalog, "hub_snapshot", lambda repo, need=(): None)  # an empty Hugging Face cache
    for var in ("VD_SD15", "VD_MOTION_ADAPTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VD_SAM2_DIR", str(tmp_path / "sam2"))
    runner = CliRunner()
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    comps = {c["name"]: c for c in out["components"]}
    assert not comps["sd15"]["present"] and "hf download" in comps["sd15"]["get"]
    assert not comps["motion_adapter"]["present"] and "v3_sd15_mm.ckpt" in comps["motion_adapter"]["get"]
    assert comps["clip-bpe"]["present"]
    assert out["specs"] == {"tiny": True, "sd15-animatediff-v3": False}
    sam2 = [c for c in out["components"] if c["name"].startswith("sam2")]
    assert sam2 and all(c["get"] for c in sam2 if not c["present"])

    # weights given through the environment are found (an SD1.5 folder, an original motion-module file,
    # a SAM2 checkpoint in VD_SAM2_DIR)
    _write_sd15_folder(tmp_path / "sd15", tiny_parts)
    (tmp_path / "mm.ckpt").write_bytes(b"x")
    monkeypatch.setenv("VD_SD15", str(tmp_path / "sd15"))
    monkeypatch.setenv("VD_MOTION_ADAPTER", str(tmp_path / "mm.ckpt"))
    sam2_names = [c["name"].removeprefix("sam2-") for c in sam2]
    if "tiny" in sam2_names:
        from stages.models.sam2_track import SAM2_CHECKPOINTS

        (tmp_path / "sam2").mkdir()
        (tmp_path / "sam2" / SAM2_CHECKPOINTS["tiny"].filename).write_bytes(b"x")
    out = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    comps = {c["name"]: c for c in out["components"]}
    assert comps["sd15"]["present"] and comps["sd15"]["path"] == str(tmp_path / "sd15")
    assert comps["motion_adapter"]["present"] and comps["motion_adapter"]["get"] is None
    assert out["specs"]["sd15-animatediff-v3"]
    if "tiny" in sam2_names:
        assert comps["sam2-tiny"]["present"]
    human = runner.invoke(app, ["models"])
    assert human.exit_code == 0 and "sd15" in human.stdout and "present" in human.stdout


# ------------------------------------------------------------- identity and motion-module GroupNorm groups

FINGERPRINT_SCRIPT = """
import sys
from stages.models.load import load_models
print(load_models(sys.argv[1], device="cpu", motion_adapter=sys.argv[2]).fingerprint)
"""


def test_fingerprint_is_content_only_and_process_independent(tmp_path, tiny_parts):
    import os
    import subprocess
    import sys

    folder = model_files.write_legacy_folder(tmp_path / "sd15", tiny_parts)
    mm = model_files.write_original_motion_module(tmp_path / "mm.ckpt", tiny_parts)
    root = Path(__file__).resolve().parent.parent
    prints = set()
    for seed in ("0", "1", "2"):  # diffusers' `_use_default_values` order follows the hash seed
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT, str(folder), str(mm)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        prints.add(out.stdout.strip().splitlines()[-1])
    assert len(prints) == 1
    fp = prints.pop()
    assert fp == load_models(str(folder), motion_adapter=mm).fingerprint
    # the same files elsewhere: the same identity; a changed setting in a config: another one
    shutil.copytree(folder, tmp_path / "moved")
    assert load_models(str(tmp_path / "moved"), motion_adapter=mm).fingerprint == fp
    cfg_path = tmp_path / "moved" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["norm_eps"] = 1e-6
    cfg_path.write_text(json.dumps(cfg))
    assert load_models(str(tmp_path / "moved"), motion_adapter=mm).fingerprint != fp


def test_legacy_bin_folder_loads_the_same_weights(tmp_path, tiny_parts, tiny):
    folder = model_files.write_legacy_folder(tmp_path / "sd15", tiny_parts)
    assert not list(folder.rglob("*.safetensors")) and len(list(folder.rglob("*.bin"))) == 3
    m = load_models(str(folder), motion_adapter=model_files.write_adapter_folder(tmp_path / "ad", tiny_parts))
    _assert_same_weights(m.unet, tiny.unet)
    _assert_same_weights(m.vae, tiny.vae)
    _assert_same_weights(m.text_encoder, tiny.text_encoder)


def _per_frame_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """GroupNorm of a (B, C, F, H, W) tensor written out: per frame, statistics over (C/groups, H, W)."""
    b, c, f, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(b, f, groups, c // groups, h, w).double()
    mean = y.mean(dim=(3, 4, 5), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(3, 4, 5), keepdim=True)
    y = ((y - mean) / torch.sqrt(var + eps)).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    return (y * weight.double()[None, :, None, None, None] + bias.double()[None, :, None, None, None]).float()


def test_motion_groups_come_from_the_motion_weights(tmp_path, tiny_parts, tiny):
    from diffusers import MotionAdapter

    assert tiny.unet.config.norm_num_groups == 8
    folder = model_files.write_config_folder(tmp_path / "sd15", tiny_parts)
    # the original AnimateDiff format: always 32 groups, whatever the UNet uses
    mm = model_files.write_original_motion_module(tmp_path / "mm.ckpt", tiny_parts)
    m = load_models(str(folder), motion_adapter=mm)
    norms = patches.motion_norms(m.unet)
    assert len(norms) == 2 * 4 + 3 * 4 and {n.num_groups for n in norms.values()} == {32}
    resnet_groups = {mod.num_groups for name, mod in m.unet.named_modules()
                     if isinstance(mod, torch.nn.GroupNorm) and ".resnets." in name}
    assert resnet_groups == {8}
    seen = {}
    name = "down_blocks.1.motion_modules.0.norm"
    hook = dict(m.unet.named_modules())[name].register_forward_hook(
        lambda mod, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    z = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    eps_32 = ops.unet_eps(m, z, 500, emb)
    hook.remove()
    norm = norms[name]
    torch.testing.assert_close(seen["y"], _per_frame_group_norm(seen["x"], 32, norm.weight, norm.bias, norm.eps),
                               rtol=1e-4, atol=1e-5)
    # the tiny model's motion modules use 8 groups: same weights, different noise prediction
    assert (eps_32 - ops.unet_eps(tiny, z, 500, emb)).abs().max() > 1e-3
    # a diffusers MotionAdapter folder: its own motion_norm_num_groups
    adapter = MotionAdapter(**{**configs.TINY_ADAPTER_CONFIG, "motion_norm_num_groups": 16})
    adapter.load_state_dict(tiny_parts[1].state_dict())
    adapter.save_pretrained(tmp_path / "adapter16")
    m16 = load_models(str(folder), motion_adapter=tmp_path / "adapter16")
    assert {n.num_groups for n in patches.motion_norms(m16.unet).values()} == {16}
    assert m16.fingerprint != m.fingerprint


# ------------------------------------------------------------------------------------ catalog and caches

def test_catalog_and_status_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; from stages.models import catalog, status; status.models_status(); status.eval_status(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_hub_snapshot_prefers_refs_main_then_newest_complete(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--name"
    assert catalog.hub_snapshot("org/name") is None and catalog.hub_file("org/name", "a.json") is None
    for commit, names in (("old", ("a.json", "b.bin")), ("main1", ("a.json",))):
        for name in names:
            (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / commit / name).write_text(commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("main1\n")
    assert catalog.hub_snapshot("org/name") == repo / "snapshots" / "main1"
    assert catalog.hub_file("org/name", "a.json") == repo / "snapshots" / "main1" / "a.json"
    # a file refs/main's snapshot lacks comes from another snapshot that has it
    assert catalog.hub_file("org/name", "b.bin") == repo / "snapshots" / "old" / "b.bin"
    assert catalog.hub_snapshot("org/name", [("b.safetensors", "b.bin"), "a.json"]) == repo / "snapshots" / "old"
    assert catalog.hub_snapshot("org/name", ["c.json"]) is None
    (repo / "refs" / "main").write_text("gone")  # refs/main naming a missing snapshot: any snapshot will do
    assert catalog.hub_snapshot("org/name") in {repo / "snapshots" / "old", repo / "snapshots" / "main1"}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vd_cache("lpips") == tmp_path / "xdg" / "vd" / "lpips"


def test_fingerprints_are_stable_across_versions():
    """Stored workspaces carry fingerprints: a refactor must not change them (values from before the split)."""
    from stages.models.identity import random_fingerprint

    assert random_fingerprint("tiny", 0, configs.RANDOM_SPECS["tiny"]) == "tiny-0-953d2fcc688d"
    assert random_fingerprint("tiny", 3, configs.RANDOM_SPECS["tiny"]) == "tiny-3-953d2fcc688d"
