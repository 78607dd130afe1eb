"""`vd edit --first-frame`: SparseCtrl RGB on the target slots (stages/edit/first_frame.py), its weights
(stages/models/sparsectrl.py), one-line refusals, the CLI end to end with tiny weights on disk, manifests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import stages.models.catalog as catalog
import stages.models.ops
from conftest import make_workspace
from stages.common.errors import InputError, ModelMissingError
from stages.common.progress import Progress
from stages.edit.first_frame import map_to_frame
from stages.edit.run import EditConfig, edit_latents, load_inversion_for_edit, plan_edit
from stages.io.workspace import Workspace
from stages.models.sparsectrl import SparseCtrl, locate, tiny_sparsectrl
from test_edit import SOURCE
from vdcli.app import app

STEPS = 2
runner = CliRunner()


@pytest.fixture(scope="module")
def inverted(tiny, tmp_path_factory):
    from stages.invert import InvertConfig, run_invert

    ws = make_workspace(tmp_path_factory.mktemp("ff") / "ws")
    run_invert(ws, InvertConfig(prompt=SOURCE, subject="brown bear", model="tiny", steps=STEPS, null_steps=1),
               Progress(quiet=True), models=tiny)
    return ws


@pytest.fixture(scope="module")
def ctrl() -> SparseCtrl:
    return SparseCtrl(tiny_sparsectrl(), "random (test)", "tiny-sparsectrl")


@pytest.fixture
def image(inverted, tmp_path) -> Path:
    """An 'edited' first frame: frame 0 mirrored, as a PNG at the workspace's frame size."""
    path = tmp_path / "edited.png"
    Image.fromarray(np.ascontiguousarray(inverted.read("video/frames")[0][:, ::-1])).save(path)
    return path


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No SparseCtrl anywhere: VD_SPARSECTRL unset, an empty Hugging Face cache."""
    monkeypatch.delenv(catalog.ENV_SPARSECTRL, raising=False)
    monkeypatch.setattr(catalog, "hub_cache", lambda: tmp_path / "empty-hub")


def edit(ws, models, ctrl=None, **kw) -> tuple[torch.Tensor, dict]:
    inv = load_inversion_for_edit(ws)
    job = plan_edit(ws, inv, EditConfig(**kw))
    if job.first_frame is not None:
        job.first_frame.controlnet = ctrl
    return edit_latents(ws, inv, models, job, Progress(quiet=True))


def listing(ws) -> set[str]:
    return {str(p.relative_to(ws.path)) for p in ws.path.rglob("*")
            if not p.relative_to(ws.path).parts[0] in (".locks", ".tmp") and p.name != ".vd.lock"}


# ------------------------------------------------------------------------------------------ sampling
def test_scale_zero_is_todays_edit_exactly_and_a_scale_acts(inverted, tiny, ctrl, image):
    base, _ = edit(inverted, tiny, prompt="tiger")
    zero, stats = edit(inverted, tiny, ctrl, prompt="tiger", first_frame=str(image), first_frame_scale=0.0)
    assert stats["first_frame"]["calls"] == STEPS  # SparseCtrl ran (on the real tiny UNet) and added nothing
    assert torch.equal(zero, base)
    one, stats = edit(inverted, tiny, ctrl, prompt="tiger", first_frame=str(image))
    assert stats["first_frame"]["calls"] == STEPS and stats["first_frame"]["scale"] == 1.0
    assert float((one - base).norm() / base.norm()) > 1e-3
    none, stats = edit(inverted, tiny, ctrl, prompt="tiger", first_frame=str(image), first_frame_steps=0)
    assert stats["first_frame"]["calls"] == 0 and torch.equal(none, base)


def test_half_scale_gives_exactly_half_the_residuals(inverted, tiny, ctrl, image, monkeypatch):
    """The scale S is applied once and linearly: every residual reaching the UNet at S = 0.5 is exactly
    0.5 x the one at S = 1 (x 0.5 is exact in binary floating point); a scale applied twice gives 0.25 x."""
    seen: dict[float, list[Any]] = {}

    def stand_in(models: Any, z: torch.Tensor, t: int, emb: torch.Tensor, residuals: Any = None) -> torch.Tensor:
        seen[scale].append(residuals)
        return 0.5 * z + 1e-3 * t  # the UNet's answer does not matter here, only what it is handed

    monkeypatch.setattr(stages.models.ops, "unet_eps", stand_in)
    for scale in (1.0, 0.5):
        seen[scale] = []
        edit(inverted, tiny, ctrl, prompt="tiger", first_frame=str(image), first_frame_scale=scale)
    assert len(seen[1.0]) == len(seen[0.5]) == STEPS
    for full, half in zip(seen[1.0], seen[0.5]):
        (down_1, mid_1), (down_h, mid_h) = full, half
        assert len(down_1) == len(down_h) == 12
        for one, h in zip(list(down_1) + [mid_1], list(down_h) + [mid_h]):
            assert one.abs().max() > 1e-4  # S = 1 adds something
            assert torch.equal(h, 0.5 * one)


class SpyControlNet:
    """Wraps the tiny SparseCtrl and records the inputs of each call."""

    def __init__(self, model: Any):
        self.model, self.calls = model, []

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, sample: torch.Tensor, t: torch.Tensor, **kw: Any) -> Any:
        self.calls.append({"sample": sample.clone(), "t": int(t), **{k: v.clone() if torch.is_tensor(v) else v
                                                                     for k, v in kw.items()}})
        return self.model(sample, t, **kw)


def test_residuals_reach_only_the_target_slots_and_only_frame_zero_is_conditioned(inverted, tiny, ctrl, image,
                                                                                   monkeypatch):
    calls: list[dict[str, Any]] = []

    def stand_in(models: Any, z: torch.Tensor, t: int, emb: torch.Tensor, residuals: Any = None) -> torch.Tensor:
        calls.append({"z": z, "emb": emb, "residuals": residuals})
        return 0.5 * z + 1e-3 * t + torch.tensor([0.1, 0.3, 0.7, 1.1]).view(4, 1, 1, 1, 1)

    monkeypatch.setattr(stages.models.ops, "unet_eps", stand_in)
    spy = SpyControlNet(ctrl.model)
    inv = load_inversion_for_edit(inverted)
    inv.attrs["windows"] = {"window": 3, "overlap": 1}  # windows (0, 3) and (1, 4): frame 0 is in the first only
    job = plan_edit(inverted, inv, EditConfig(prompt="tiger", first_frame=str(image), first_frame_steps=1))
    job.first_frame.controlnet = SparseCtrl(spy, "spy", "spy")
    edit_latents(inverted, inv, tiny, job, Progress(quiet=True))

    assert len(calls) == 2 * STEPS  # two windows per step
    conditioned = [c for c in calls if c["residuals"] is not None]
    assert len(conditioned) == 1 and conditioned[0] is calls[0]  # step 0, window (0, 3); steps >= K get none
    assert len(spy.calls) == 1
    n, (h, w) = 3, inverted.read("video/frames").shape[1:3]
    h, w = h // 8, w // 8
    down, mid = conditioned[0]["residuals"]
    expected, _ = ctrl.model(torch.zeros(2, 4, n, h, w), torch.tensor(spy.calls[0]["t"]),
                             encoder_hidden_states=spy.calls[0]["encoder_hidden_states"],
                             controlnet_cond=spy.calls[0]["controlnet_cond"],
                             conditioning_mask=spy.calls[0]["conditioning_mask"], return_dict=False)
    assert len(down) == len(expected) == 12
    for res, exp in zip(list(down) + [mid], list(expected) + [None]):
        assert res.shape[0] == 4 * n  # rows slot * n + frame of the 4-slot UNet batch
        assert res[:2 * n].abs().sum() > 0  # edit-uncond, edit-cond: SparseCtrl's output
        assert torch.equal(res[2 * n:], torch.zeros_like(res[2 * n:]))  # recon slots: nothing
        if exp is not None:
            assert res.shape[1:] == exp.shape[1:]
            torch.testing.assert_close(res[:2 * n], exp)
    emb = conditioned[0]["emb"]
    torch.testing.assert_close(spy.calls[0]["encoder_hidden_states"], emb[:2 * n])  # the target slots' texts
    mask, cond = spy.calls[0]["conditioning_mask"], spy.calls[0]["controlnet_cond"]
    assert mask.shape == (2, 1, n, h, w)
    assert bool((mask[:, :, 0] == 1).all()) and not mask[:, :, 1:].any()
    assert not cond[:, :, 1:].any() and cond[:, :, 0].abs().sum() > 0
    seed = (inv.attrs.get("config") or {}).get("seed", 42)
    latent = stages.models.ops.vae_encode(tiny, job.first_frame.image[None], seed=seed)[0]
    torch.testing.assert_close(cond[0, :, 0], latent)


# ------------------------------------------------------------------------------------------ the image
def test_image_mapping_uses_the_workspace_rule(tmp_path):
    ws = make_workspace(tmp_path / "ws", frames=2)
    src = dict(ws.attrs["source"], source_size=[32, 128], resize="pad")  # 128x32 source padded into 64x64
    ws.update_attrs(source=src)
    same = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert map_to_frame(ws, same, "x")[0] is same
    wide = np.full((32, 128, 3), 200, np.uint8)
    mapped, how = map_to_frame(ws, wide, "x")
    assert "pad" in how and mapped.shape == (64, 64, 3)
    assert (mapped[:24] == 0).all() and (mapped[24:40] == 200).all() and (mapped[40:] == 0).all()  # 64x16, centred
    with pytest.raises(InputError, match="cannot be mapped"):
        map_to_frame(ws, np.zeros((64, 100, 3), np.uint8), "x")


# ------------------------------------------------------------------------------------------ CLI
def vd(*args: Any):
    return runner.invoke(app, [*map(str, args)])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: ") and text in lines[0], result.stderr


def test_bad_inputs_one_line_each_and_nothing_written(inverted, loads, image, tmp_path, no_weights):
    before = listing(inverted)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    gray, alpha, odd = tmp_path / "gray.png", tmp_path / "alpha.png", tmp_path / "odd.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(gray)
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(alpha)
    Image.fromarray(np.zeros((64, 20, 3), np.uint8)).save(odd)
    ws = inverted.path
    one_line_error(vd("edit", ws, "--first-frame", tmp_path / "missing.png"), 3, "not found")
    one_line_error(vd("edit", ws, "--first-frame", text), 3, "not a readable image")
    one_line_error(vd("edit", ws, "--first-frame", gray), 3, "1 channel(s)")
    one_line_error(vd("edit", ws, "--first-frame", alpha), 3, "transparent")
    one_line_error(vd("edit", ws, "--first-frame", odd), 3, "cannot be mapped")
    for bad in ("nan", "inf", "-1"):
        one_line_error(vd("edit", ws, "--first-frame", image, "--first-frame-scale", bad), 2, "--first-frame-scale")
    one_line_error(vd("edit", ws, "--first-frame", image, "--first-frame-steps", "-1"), 2, "--first-frame-steps")
    one_line_error(vd("edit", ws, "--prompt", "tiger", "--first-frame-scale", "2"), 2, "need --first-frame")
    assert loads == [] and listing(inverted) == before and not inverted.has("edits")


def test_missing_weights_exit_4_for_a_model_other_than_tiny(inverted, loads, image, tmp_path, no_weights):
    real = tmp_path / "real"  # the same workspace, as if inverted with the real model
    shutil.copytree(inverted.path, real)
    ws = Workspace.open(real)
    ws.update_attrs("inversion", model=dict(ws.group_attrs("inversion")["model"], spec="sd15-animatediff-v3"))
    one_line_error(vd("edit", real, "--first-frame", image), 4, "vd models --get sparsectrl-rgb")
    assert loads == [] and not ws.has("edits")


def test_tiny_model_gets_the_tiny_random_sparsectrl_named_in_every_output(inverted, loads, image, tmp_path,
                                                                          no_weights):
    """No SparseCtrl weights anywhere: an edit of a `--model tiny` inversion runs with the seeded random
    SparseCtrl, named "tiny-random" in the log, --json and the edit's attrs."""
    from stages.models.sparsectrl import random_sparsectrl

    shutil.copytree(inverted.path, tmp_path / "copy")
    ws = Workspace.open(tmp_path / "copy")
    r = vd("edit", ws.path, "--first-frame", image, "--first-frame-steps", "1", "--json")
    assert r.exit_code == 0, r.output
    assert loads == ["tiny"]
    assert "first frame: SparseCtrl tiny-random (untrained" in r.stderr
    data = json.loads(r.stdout)
    assert data["first_frame"]["weights"] == "tiny-random" and "tiny-random" in data["first_frame"]["fingerprint"]
    assert data["first_frame"]["calls"] == 1
    attrs = ws.group_attrs("edits/first-frame")
    assert attrs["first_frame"]["sparsectrl"] == "tiny-random"
    assert attrs["stats"]["first_frame"]["weights"] == "tiny-random"
    one, two = random_sparsectrl(SimpleNamespace(device=torch.device("cpu"))), tiny_sparsectrl(0)
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), two.state_dict().values()))
    first = ws.read("edits/first-frame/frames")
    r = vd("edit", ws.path, "--first-frame", image, "--first-frame-steps", "1", "--name", "again", "-q")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(ws.read("edits/again/frames"), first)  # seeded: the same edit again


def test_cli_end_to_end_with_tiny_weights_on_disk(inverted, loads, tmp_path, monkeypatch):
    from stages.edit.fresh import is_current

    weights = tmp_path / "sparsectrl"
    tiny_sparsectrl().save_pretrained(weights)
    monkeypatch.setenv(catalog.ENV_SPARSECTRL, str(weights))
    big = tmp_path / "edited.png"  # twice the frame size: resized with the workspace's rule (crop)
    Image.fromarray(np.repeat(np.repeat(inverted.read("video/frames")[0][::-1], 2, 0), 2, 1)).save(big)
    r = vd("edit", inverted.path, "--first-frame", big, "--first-frame-scale", "0.5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["name"] == "first-frame" and data["resolved_prompt"] == SOURCE and data["mode"] == "first-frame"
    assert loads == ["tiny"]
    base = "edits/first-frame"
    attrs = inverted.group_attrs(base)
    ff, stats = attrs["first_frame"], attrs["stats"]["first_frame"]
    assert (inverted.path / base / "first_frame.png").read_bytes() == big.read_bytes()
    assert ff["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest() and "crop" in ff["mapping"]
    assert inverted.read(f"{base}/first_frame").shape == (64, 64, 3)
    assert attrs["params"]["first_frame_scale"] == 0.5 and attrs["params"]["first_frame"] == str(big)
    assert stats["calls"] == STEPS and stats["weights"].startswith(catalog.ENV_SPARSECTRL)
    assert stats["fingerprint"].startswith("sparsectrl-rgb-")
    preview = Image.open(inverted.path / base / "preview.gif")
    assert preview.size == (3 * 64 + 2 * 4, 64)  # source | first frame | edit
    cfg = EditConfig(first_frame=str(big), first_frame_scale=0.5)
    assert is_current(inverted, cfg) == (True, "")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(big)
    assert not is_current(inverted, cfg)[0]

    listed = json.loads(vd("models", "--json").stdout)
    comp = next(c for c in listed["components"] if c["name"] == "sparsectrl-rgb")
    assert comp["present"] and comp["path"] == str(weights) and comp["fetch"] == "vd models --get sparsectrl-rgb"


def test_weights_target_and_missing_weights(no_weights, tmp_path):
    from stages.models.fetch import parse_names

    assert parse_names(["sparsectrl"]) == ["sparsectrl-rgb"] and "sparsectrl-rgb" not in parse_names(["all"])
    files = {f.filename for f in catalog.TARGETS["sparsectrl-rgb"]}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors"}
    with pytest.raises(ModelMissingError, match="vd models --get sparsectrl-rgb"):
        locate()
    with pytest.raises(ModelMissingError, match="not a SparseControlNetModel folder"):
        locate(tmp_path)


def test_weights_as_from_pretrained_reads_them(tiny, tmp_path, capfd, caplog):
    """A folder holding only the fp16 variant loads (as diffusers' variant="fp16"), and the identity hashes the
    file that was loaded: stages.models.resolve.component, the rule load_models uses."""
    from stages.models.identity import config_files, fingerprint
    from stages.models.sparsectrl import load_sparsectrl

    folder = tmp_path / "fp16-only"
    tiny_sparsectrl().save_pretrained(folder, variant="fp16")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert locate(folder)[0] == folder
    loaded = load_sparsectrl(tiny, folder)
    for name, value in tiny_sparsectrl().state_dict().items():  # save_pretrained keeps the dtype it is given
        assert torch.equal(loaded.model.state_dict()[name], value), name
    files = [folder / "diffusion_pytorch_model.fp16.safetensors"]
    assert loaded.fingerprint == fingerprint("sparsectrl-rgb", files, [config_files(folder, ("",))[0]])
    # no diffusers warning for a no-op dtype cast (it reaches users' stderr through diffusers' logging)
    assert "kept in float32" not in caplog.text + capfd.readouterr().err


def test_manifest_accepts_first_frame_per_edit(tmp_path):
    from stages.batch.manifest import validate_manifest

    entry = {"clip": "a.mp4", "prompt": SOURCE, "subject": "brown bear", "box": [0, 0, 100, 100],
             "edits": ["tiger", {"first_frame": "ff.png"}, {"prompt": "wolf", "first_frame": "ff.png",
                                                            "first_frame_steps": 3}]}
    plan = validate_manifest({"clips": [entry]}, tmp_path / "m.yaml").clips[0]
    assert plan.edit_names == ["tiger", "first-frame", "wolf"]
    assert plan.edits[1].first_frame == str((tmp_path / "ff.png").resolve()) and plan.edits[1].prompt == ""
    assert plan.edits[2].first_frame_steps == 3 and plan.edits[0].first_frame is None
    bad = dict(entry, edits=[{"first_frame": "ff.png", "first_frame_scale": -1}])
    with pytest.raises(InputError, match="--first-frame-scale"):
        validate_manifest({"clips": [bad]}, tmp_path / "m.yaml")
