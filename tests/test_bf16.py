"""bf16 end to end (issue 30): `vd mask` -> `vd invert` (each method, windows, each checkpointing level) ->
`vd edit` (subject, regions, first frame, background) -> `vd eval` -> `vd export`, with `--dtype bf16` on the
tiny model on the CPU (CPU autocast in bf16: the GPU's default compute dtype, on the ops CPU autocast
lowers). Results are finite and close to the fp32 run of the same command, within the tolerances below; the
workspace keeps float32 latents, null embeddings, guidance and offsets whatever the compute dtype.

Tolerances (constants below, each about three times what was measured): relative errors of the stored
arrays (max |bf16 - fp32| / max |fp32|, or RMS for the reconstruction), the reconstruction's PSNR in dB, and
the mean absolute difference of an edit's uint8 frames. The tiny model's random weights and CFG 7.5 amplify
rounding more than trained weights would. Checkpointing changes no number: blocks equals off exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stages.io.synthetic import moving_disc
from stages.io.workspace import Workspace
from vdcli.app import app

FRAMES, SIZE, STEPS = 4, 64, 2
SOURCE = "a brown bear walking on rocky terrain"
BEAR, ROCKS = (0, 8, 28, 60), (36, 36, 64, 64)  # X0,Y0,X1,Y1 boxes of the two objects
LATENT_TOL = 0.04  # DDIM trajectory, relative max error; measured 0.012
EMBED_TOL = 0.04  # null embeddings after Adam on bf16 gradients, relative max error; measured 0.012
RECON_TOL = 0.3  # reconstruction latents, relative RMS error (CFG 7.5 amplifies eps_c's rounding); measured 0.11
DIRECT_TOL = 0.04  # direct inversion's reconstruction: the trajectory itself up to rounding; measured 0.012
PSNR_TOL = 0.5  # dB of the reconstruction's PSNR; measured 0.06
FRAME_TOL = 10.0  # grey levels of mean |difference| of an edit's uint8 frames; measured 3.4
runner = CliRunner()
ARRAYS = ("latents", "recon_latents", "null_embeddings", "stdg/guidance")


def vd(*args: Any) -> dict[str, Any]:
    r = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def dtypes(tiny):
    """load_models hands out the module's tiny model in the compute dtype asked for (on the CPU the weights
    stay float32 and the dtype is autocast's, as load_models does); the list records what was asked."""
    import stages.models.load
    from stages.models.ops import resolve_dtype

    asked: list[str] = []

    def load(spec: str, device: Any = "auto", dtype: Any = "auto", **kw: Any) -> Any:
        asked.append(str(dtype))
        return dataclasses.replace(tiny, dtype=resolve_dtype(dtype, tiny.device))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.models.load, "load_models", load)
        yield asked


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    """`vd mask --box-only` of a PNG clip with two objects (bear, rocks): the workspace every run copies."""
    root = tmp_path_factory.mktemp("bf16")
    clip = root / "clip"
    clip.mkdir()
    for k, frame in enumerate(moving_disc(FRAMES, SIZE, SIZE, seed=5)[0]):
        Image.fromarray(frame).save(clip / f"{k:02d}.png")
    ws = root / "masked.vd"
    vd("mask", clip, "--frames", FRAMES, "--size", SIZE, "-o", ws, "--box-only",
       "--object", "bear=brown bear", "--box", ",".join(map(str, BEAR)),
       "--object", "rocks=rocky terrain", "--box", ",".join(map(str, ROCKS)))
    return ws


def invert(masked: Path, folder: Path, dtype: str, *extra: Any) -> Workspace:
    """A copy of the masked workspace, inverted with `--dtype dtype` and `extra` flags."""
    path = folder / f"{dtype}.vd"
    shutil.copytree(masked, path)
    vd("invert", path, "--prompt", SOURCE, "--subject", "brown bear", "--model", "tiny", "--steps", STEPS,
       "--null-steps", 1, "--checkpointing", "off", "--dtype", dtype, *extra)
    return Workspace.open(path)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def check_stored(ws: Workspace, dtype: str) -> None:
    """Finite float32 arrays whatever the compute dtype, which the settings name."""
    inv = ws.group_attrs("inversion")
    assert inv["settings"]["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    names = ARRAYS + (("direct_offsets",) if inv["method"] == "direct" else ())
    for name in names:
        arr = ws.array(f"inversion/{name}")
        assert arr.dtype == np.float32, (name, arr.dtype)
        assert np.isfinite(ws.read(f"inversion/{name}")).all(), name


def compare(bf: Workspace, fp: Workspace) -> dict[str, float]:
    """Relative errors of the stored arrays, bf16 against fp32."""
    return {name: rel(bf.read(f"inversion/{name}"), fp.read(f"inversion/{name}"))
            for name in ARRAYS if np.abs(fp.read(f"inversion/{name}")).max() > 0}


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def check_close(bf: Workspace, fp: Workspace, method: str = "null-text") -> None:
    """bf16 against fp32 within the module's tolerances."""
    check_stored(bf, "bf16")
    check_stored(fp, "fp32")
    err = compare(bf, fp)
    assert err["latents"] <= LATENT_TOL, err
    recon = rms(bf.read("inversion/recon_latents")[0], fp.read("inversion/recon_latents")[0])
    assert recon <= (DIRECT_TOL if method == "direct" else RECON_TOL), recon
    if method == "null-text":
        assert err["null_embeddings"] <= EMBED_TOL, err
    else:  # the embeddings are the negative prompt's or the source prompt's: the text encoder runs in fp32
        np.testing.assert_array_equal(bf.read("inversion/null_embeddings"), fp.read("inversion/null_embeddings"))
    psnr = [ws.group_attrs("inversion")["recon"]["psnr"] for ws in (bf, fp)]
    assert np.isfinite(psnr).all() and abs(psnr[0] - psnr[1]) <= PSNR_TOL, psnr


@pytest.fixture(scope="module")
def pair(masked, dtypes, tmp_path_factory) -> tuple[Workspace, Workspace]:
    """(bf16, fp32) null-text inversions of the masked clip."""
    folder = tmp_path_factory.mktemp("nulltext")
    return invert(masked, folder, "bf16"), invert(masked, folder, "fp32")


def test_null_text_inversion_in_bf16_is_close_to_fp32(pair, dtypes):
    bf, fp = pair
    check_close(bf, fp)
    assert "bf16" in dtypes and "fp32" in dtypes  # each run loaded the models in the dtype its flag named


@pytest.mark.parametrize("method", ["direct", "negative-prompt"])
def test_fast_methods_in_bf16(masked, dtypes, tmp_path, method):
    bf, fp = (invert(masked, tmp_path, dt, "--method", method) for dt in ("bf16", "fp32"))
    check_close(bf, fp, method)


def test_checkpointing_blocks_changes_no_number_in_bf16(pair, masked, dtypes, tmp_path):
    blocks = invert(masked, tmp_path, "bf16", "--checkpointing", "blocks")
    assert blocks.group_attrs("inversion")["checkpointing"]["mode"] == "blocks"
    assert pair[0].group_attrs("inversion")["checkpointing"]["mode"] == "off"
    for name in ARRAYS:
        np.testing.assert_allclose(blocks.read(f"inversion/{name}"), pair[0].read(f"inversion/{name}"),
                                   rtol=0, atol=1e-6, err_msg=name)


def edit_diff(bf: Workspace, fp: Workspace, *flags: Any) -> str:
    """Run the same edit on both workspaces in their dtypes; check the bf16 frames; return the edit's name."""
    names = [vd("edit", ws.path, *flags, "--dtype", dt)["name"] for ws, dt in ((bf, "bf16"), (fp, "fp32"))]
    assert names[0] == names[1]
    a, b = (ws.read(f"edits/{names[0]}/frames") for ws in (bf, fp))
    assert a.dtype == np.uint8 and a.shape == (FRAMES, SIZE, SIZE, 3)
    diff = float(np.abs(a.astype(float) - b.astype(float)).mean())
    assert diff <= FRAME_TOL, (names[0], diff)
    return names[0]


def test_edits_eval_and_export_in_bf16(pair, dtypes, tmp_path):
    """Subject, per-region and first-frame edits in bf16 close to fp32; vd eval's numbers finite; the
    subject edit exported."""
    bf, fp = pair
    image = tmp_path / "first.png"
    Image.fromarray(np.ascontiguousarray(bf.read("video/frames")[0][:, ::-1])).save(image)
    subject = edit_diff(bf, fp, "--prompt", "tiger")
    edit_diff(bf, fp, "--region", "bear=white tiger")
    edit_diff(bf, fp, "--prompt", "tiger", "--first-frame", image, "--name", "first")
    out = vd("eval", bf.path, "--metrics", "psnr,ssim,warp")
    assert set(out["items"]) == {"reconstruction", subject, "white-tiger", "first"}
    for item in out["items"].values():
        assert all(np.isfinite(v) for k, v in item["metrics"].items() if isinstance(v, float)), item["metrics"]
    exported = vd("export", bf.path, "--edit", subject, "--codec", "png")
    assert sorted(Path(exported["output"]).glob("*.png")), exported


def test_windows_and_background_edit_in_bf16(masked, dtypes, tmp_path):
    """Two overlapping windows and a background inversion, then a --background edit."""
    flags = ("--region", "background", "--window", 3, "--overlap", 2)
    bf, fp = (invert(masked, tmp_path, dt, *flags) for dt in ("bf16", "fp32"))
    assert bf.group_attrs("inversion")["windows"]["spans"] == [[0, 3], [1, 4]]
    check_close(bf, fp)
    edit_diff(bf, fp, "--prompt", "a brown bear walking on green grass", "--background", "--name", "bg")
