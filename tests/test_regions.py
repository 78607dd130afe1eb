"""Per-region edits (`vd edit --region NAME=PHRASE`, docs/concepts/extensions.md): prompt building and checks,
the layout modulation wired through a region edit (its formula: tests/test_layout_modulation.py), SA-II
per object and the blend per object (stand-in UNet, tests/fake_unet.py style), the one-region path against
the single-subject edit (real tiny inversion), and the CLI."""

from __future__ import annotations

import json
import zlib
from collections import defaultdict

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stages.edit.sampling
import stages.method.control.editing as editing
import stages.models.ops
from conftest import make_workspace, write_objects
from fake_unet import SOURCE, FakeEditUNet, fake_inversion
from stages.common.errors import InputError, UsageError
from stages.common.progress import Progress
from stages.edit.regions import parse_assignments, parse_regions_line, plan_regions, token_positions
from stages.edit.run import EditConfig, edit_latents, load_inversion_for_edit, plan_edit, run_edit
from stages.method.control.controller import attention_probs, module_kind
from stages.method.control.layout import RegionKeys, modulate
from stages.method.windows import plan_windows

FRAMES, STEPS, SIZE = 2, 5, 64
TWO_TARGET = "A tiger, walking on rocky terrain, next to a red brick wall."


def columns(frames: int, lo: int, hi: int, size: int = SIZE) -> np.ndarray:
    """(F, size, size) uint8 mask of pixel columns [lo, hi) (8 px = one latent column)."""
    m = np.zeros((frames, size, size), np.uint8)
    m[:, :, lo:hi] = 1
    return m


def two_objects(frames: int = FRAMES, wall_phrase: str | None = "stone wall") -> dict:
    """bear: latent columns 0-2, wall: latent columns 5-7, background: columns 3-4."""
    return {"bear": (columns(frames, 0, 24), "brown bear"), "wall": (columns(frames, 40, 64), wall_phrase)}


@pytest.fixture
def ws2(tmp_path):
    return make_workspace(tmp_path / "ws", frames=FRAMES, size=SIZE, objects=two_objects())


def _latent_cols(lo: int, hi: int) -> torch.Tensor:
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[:, lo:hi] = True
    return m.reshape(64)


BEAR, WALL = _latent_cols(0, 3), _latent_cols(5, 8)
BG = ~(BEAR | WALL)


# ----------------------------------------------------------------------------------------- parsing and plans
def test_parse_assignments_and_prompt_file_lines():
    assert parse_assignments(["man=a  silver robot", " dog = cat"], "--region") == {"man": "a silver robot",
                                                                                    "dog": "cat"}
    for bad in (["man"], ["=robot"], ["man= ,"]):
        with pytest.raises(UsageError, match="NAME=PHRASE"):
            parse_assignments(bad, "--region")
    with pytest.raises(UsageError, match="twice"):
        parse_assignments(["dog=cat", "dog=wolf"], "--region")
    assert parse_regions_line('regions: man="a silver robot" dog=cat') == {"man": "a silver robot", "dog": "cat"}
    assert parse_regions_line("a tiger on rocks") is None
    with pytest.raises(UsageError):
        parse_regions_line("regions:")


def test_target_prompt_replaces_each_objects_phrase(ws2):
    plan = plan_regions(ws2, SOURCE, {"bear": "a tiger", "wall": "a red brick wall"}, {})
    assert plan.target == TWO_TARGET  # the article before each phrase is kept once
    assert plan.names == ["bear", "wall"] and plan.edited == [True, True]
    assert [(r.src_spans, r.tgt_spans) for r in plan.regions] == [([(1, 3)], [(1, 2)]), ([(10, 12)], [(9, 12)])]
    one = plan_regions(ws2, SOURCE, {"wall": "hedge"}, {"wall": "wall"})  # --object overrides the stored phrase
    assert one.target == SOURCE.replace("wall.", "hedge.") and one.edited == [False, True]


@pytest.mark.parametrize("regions, objects, match", [
    ({"dog": "cat"}, {}, "unknown object 'dog'"),
    ({"bear": "tiger"}, {"cat": "bear"}, "unknown object 'cat'"),
    ({"bear": "tiger"}, {"bear": "polar bear"}, "not in the inversion prompt"),
    ({"bear": "tiger", "wall": "hedge"}, {"wall": "bear"}, "name the same words"),
])
def test_bad_regions_are_input_errors(ws2, regions, objects, match):
    with pytest.raises(InputError, match=match):
        plan_regions(ws2, SOURCE, regions, objects)


def test_objects_without_phrase_and_workspaces_without_objects(tmp_path):
    ws = make_workspace(tmp_path / "a", frames=FRAMES, objects=two_objects(wall_phrase=None))
    with pytest.raises(InputError, match="no source phrase; give it with --object wall="):
        plan_regions(ws, SOURCE, {"wall": "hedge"}, {})
    assert plan_regions(ws, SOURCE, {"bear": "tiger"}, {}).target.startswith("A tiger,")
    with pytest.raises(InputError, match="no named objects"):
        plan_regions(make_workspace(tmp_path / "b", frames=FRAMES), SOURCE, {"bear": "tiger"}, {})


def test_region_settings_checks():
    from stages.edit.run import validate_edit

    for kw, match in (({"objects": {"bear": "bear"}}, "--object"), ({"layout_steps": 1.5}, "--layout-steps"),
                      ({"background": True}, "--background"), ({"blend": ["bear"]}, "--blend")):
        with pytest.raises(UsageError, match=match):
            validate_edit(EditConfig(regions={"bear": "tiger"} if "objects" not in kw else {}, **kw))


# ----------------------------------------------------------------------------------------- SA-II per object
def test_region_keys_with_one_edited_object_is_todays_sa2():
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:40, 5:30] = 1
    keys = RegionKeys(labels, [True], (8, 8))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, 64, 4, generator=gen) for _ in range(3))
    hide = editing.KeyMasks(labels > 0, (8, 8)).for_tokens(64, q.device)
    assert torch.equal(keys.attention(q, k, v), editing.sa2_attention(q, k, v, hide))


# ----------------------------------------------------------------------------------------- stand-in UNet
class ProbeUNet:
    """Replaces unet_eps; each step calls every installed handler of one kind with q/k fixed per (module,
    step) and values that make the output the attention weights themselves: the identity over the 77 text
    tokens (cross) or over [source | edit] keys (self: recon slots carry [I | 0], edit slots [0 | I])."""

    def __init__(self, monkeypatch, kind: str):
        self.kind, self.controller = kind, None
        self.seen: dict[int, list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        real = stages.edit.sampling.install

        def spy(unet, controller):
            self.controller = real(unet, controller)
            return self.controller

        monkeypatch.setattr(stages.edit.sampling, "install", spy)
        monkeypatch.setattr(stages.models.ops, "unet_eps", self)

    def __call__(self, models, z, t, emb):
        b, f, c, h, w = z.shape
        n, step = h * w, self.controller.step
        for name, handler in sorted(self.controller.handlers.items()):
            if module_kind(name) != self.kind:
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
            keys = 77 if self.kind == "cross" else n
            q = 3 * torch.randn(4 * f, 1, n, 8, generator=gen)
            k = torch.randn(4 * f, 1, keys, 8, generator=gen)
            if self.kind == "cross":
                v = torch.eye(77).expand(4 * f, 1, 77, 77)
            else:
                src = torch.cat([torch.eye(n), torch.zeros(n, n)], 1).expand(f, 1, n, 2 * n)
                edt = torch.cat([torch.zeros(n, n), torch.eye(n)], 1).expand(f, 1, n, 2 * n)
                v = torch.cat([edt, edt, src, src])
            self.seen[step].append((name, q, k, handler(name, None, q, k, v.contiguous())))
        return 0.5 * z + 1e-3 * t + torch.tensor(FakeEditUNet.SLOT).view(4, 1, 1, 1, 1)


def _run(ws, tiny, inv, **kw):
    job = plan_edit(ws, inv, EditConfig(**kw))
    e, stats = edit_latents(ws, inv, tiny, job, Progress(quiet=True))
    return job, e, stats


LABELS = torch.where(BEAR, 1, torch.where(WALL, 2, 0))  # (64,) latent labels of two_objects()
SIZE_REG = torch.where(BG, 0.75, 0.625)  # 1 - 24/64 for bear and wall, 1 - 16/64 for the background


def _modulated(q, k, positive, lam, t):
    """softmax of the modulated scores, written from the formula (s per query pixel, w_t = ((t-1)/1000)^5)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return modulate(scores, positive, SIZE_REG[:, None], lam * ((t - 1) / 1000) ** 5).softmax(-1)


def test_layout_modulates_the_edit_cond_cross_map_in_the_layout_steps_only(ws2, tiny, monkeypatch):
    """Each edited object's target-phrase tokens are positive at its own pixels (lambda 1.0); every slot but
    edit-cond keeps the plain map; after int(5 * 0.4) = 2 steps edit-cond is plain too."""
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    probe = ProbeUNet(monkeypatch, "cross")
    job, _, stats = _run(ws2, tiny, inv, regions={"bear": "a tiger", "wall": "a red brick wall"},
                         layout_steps=0.4, cross=False, sa1=False, sa2=False, region_blend=False)
    assert job.target == TWO_TARGET and stats["layout_steps"] == 2  # int(5 * 0.4)
    positions = [token_positions(tiny.tokenizer, job.target, r.tgt_spans) for r in job.regions.regions]
    assert positions == [[2], [12, 13, 14]]
    positive = torch.zeros(64, 77, dtype=torch.bool)
    positive[BEAR, 2] = True
    positive[WALL, 12:15] = True
    layers = stats["installed"]["layout"]
    assert layers == 16 and stats["calls"]["layout"] == 2 * layers
    for step in range(STEPS):
        t = inv.schedule.edit_timesteps[step]
        assert len(probe.seen[step]) == layers
        for name, q, k, out in probe.seen[step]:
            plain = attention_probs(q, k)
            other = torch.cat([out[:FRAMES], out[2 * FRAMES:]])
            torch.testing.assert_close(other, torch.cat([plain[:FRAMES], plain[2 * FRAMES:]]), rtol=0, atol=1e-5)
            got, base = out[FRAMES:2 * FRAMES], plain[FRAMES:2 * FRAMES]
            if step >= 2:
                torch.testing.assert_close(got, base, rtol=0, atol=1e-5)
                continue
            want = _modulated(q[FRAMES:2 * FRAMES], k[FRAMES:2 * FRAMES], positive, 1.0, t)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert (got[..., BEAR, 2] > base[..., BEAR, 2]).all(), (name, step)


def test_layout_acts_on_inserted_target_tokens_with_p2p_on(ws2, tiny, monkeypatch):
    """With P2P refine (tau_c) the inserted word keeps its own, modulated map; the unedited wall and the
    background have no phrase tokens, so "tiger" is not positive there."""
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    probe = ProbeUNet(monkeypatch, "cross")
    job, _, stats = _run(ws2, tiny, inv, regions={"bear": "a tiger"}, layout_steps=0.2, sa1=False, sa2=False,
                         region_blend=False)
    assert stats["cross_mode"] == "refine" and stats["calls"]["p2p"] > 0 and stats["calls"]["layout"] > 0
    positive = torch.zeros(64, 77, dtype=torch.bool)
    positive[BEAR, 2] = True
    t = inv.schedule.edit_timesteps[0]
    for name, q, k, out in probe.seen[0]:
        want = _modulated(q[FRAMES:2 * FRAMES], k[FRAMES:2 * FRAMES], positive, 1.0, t)[..., 2]
        got = out[FRAMES:2 * FRAMES][..., 2]  # "tiger": inserted, alpha 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = attention_probs(q[FRAMES:2 * FRAMES], k[FRAMES:2 * FRAMES])[..., 2]
        assert (got[..., BEAR] > plain[..., BEAR]).all(), name


def test_layout_modulates_self_attention_below_full_resolution_by_label(ws2, tiny, monkeypatch):
    """Self-attention (lambda 0.3): query and key with the same label are positive, the background being a
    region of its own; the full-resolution layers (down_blocks.0, up_blocks.3) are never modulated."""
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    probe = ProbeUNet(monkeypatch, "self")
    _, _, stats = _run(ws2, tiny, inv, regions={"bear": "tiger"}, layout_steps=0.4, cross=False, sa1=False,
                       sa2=False, region_blend=False)
    assert stats["installed"]["layout_self"] == 11 and stats["calls"]["layout_self"] == 2 * 11
    positive = LABELS[:, None] == LABELS[None, :]
    for step in range(STEPS):
        t = inv.schedule.edit_timesteps[step]
        names = [name for name, *_ in probe.seen[step]]
        assert len(names) == 11 and not any(n.startswith(("down_blocks.0.", "up_blocks.3.")) for n in names)
        for name, q, k, out in probe.seen[step]:
            plain = attention_probs(q, k)
            for slot in (0, 2, 3):  # edit-uncond and recon: plain ([0 | I] or [I | 0] values)
                part = out[slot * FRAMES:(slot + 1) * FRAMES]
                torch.testing.assert_close(part[..., 64:] if slot == 0 else part[..., :64],
                                           plain[slot * FRAMES:(slot + 1) * FRAMES], rtol=0, atol=1e-5)
            got = out[FRAMES:2 * FRAMES][..., 64:]
            want = plain[FRAMES:2 * FRAMES] if step >= 2 else \
                _modulated(q[FRAMES:2 * FRAMES], k[FRAMES:2 * FRAMES], positive, 0.3, t)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _key_sets(bear: torch.Tensor, wall: torch.Tensor, bear_edited: bool, wall_edited: bool) -> torch.Tensor:
    """(N, 2N) allowed [source | edit] keys per query by the rule of RegionKeys, written out."""
    bg = ~(bear | wall)
    rows = []
    for n in range(bear.numel()):
        if bg[n]:
            src, edt = bg, torch.ones_like(bg)
        else:
            own, edited = (bear, bear_edited) if bear[n] else (wall, wall_edited)
            src, edt = (bg if edited else own), bg | own
        rows.append(torch.cat([src, edt]))
    return torch.stack(rows)


def test_sa2_per_region_draws_keys_only_from_its_own_region_in_every_window(tmp_path, tiny, monkeypatch):
    """4 frames in windows (0,2) (2,4); the bear box moves one latent column per frame. Every edit-slot
    query puts positive weight exactly on its allowed keys: bear (edited) on the source background and the
    edit's background and bear; wall (unedited) on the source wall only and the edit's background and wall;
    the background on the source background and every edit key."""
    frames = 4
    bear_px = np.zeros((frames, SIZE, SIZE), np.uint8)
    for f in range(frames):
        bear_px[f, :, 8 * f:8 * f + 16] = 1
    objects = {"bear": (bear_px, "brown bear"), "wall": (columns(frames, 48, 64), "stone wall")}
    ws = make_workspace(tmp_path / "ws", frames=frames, objects=objects)
    inv = fake_inversion(tiny, STEPS, frames, (8, 8))
    windows = plan_windows(frames, 2, 0)
    inv.attrs["windows"] = windows.describe()
    probe = ProbeUNet(monkeypatch, "self")
    _, _, stats = _run(ws, tiny, inv, regions={"bear": "tiger"}, sa1=False, tau_s=0.0, cross=False,
                       layout_steps=0.0, region_blend=False)
    assert stats["calls"]["sa2"] == STEPS * len(windows.spans) * stats["installed"]["sa2"] > 0
    wall = torch.from_numpy(columns(1, 48, 64)[0, ::8, ::8] > 0).reshape(64)
    for step in (0, STEPS - 1):
        calls = probe.seen[step]
        assert len(calls) == len(windows.spans) * stats["installed"]["sa2"]
        for c, (name, _q, _k, out) in enumerate(calls):
            s, _e = windows.spans[c // stats["installed"]["sa2"]]
            for f in range(2):
                bear = torch.from_numpy(bear_px[s + f, ::8, ::8] > 0).reshape(64)
                allowed = _key_sets(bear, wall, True, False)
                for slot in (0, 1):  # edit-uncond, edit-cond
                    w = out[slot * 2 + f, 0]
                    assert torch.equal(w > 0, allowed), (name, step, s + f, slot)
                    torch.testing.assert_close(w.sum(-1), torch.ones(64))


def test_blend_of_an_unedited_object_is_zero(ws2, tiny, monkeypatch):
    """With every edited object's word mask pinned to the whole frame, the unedited wall stays exactly on
    the source path after every blend step; the edited bear and the background follow the edit."""
    monkeypatch.setattr(editing.LocalBlend, "mask", lambda self: torch.ones(FRAMES, 1, 8, 8))
    fake = FakeEditUNet(monkeypatch)
    inv = fake_inversion(tiny, STEPS, FRAMES, (8, 8))
    _, final, stats = _run(ws2, tiny, inv, regions={"bear": "tiger"})
    assert stats["installed"]["blend"] > 0
    lat = torch.from_numpy(inv.latents)
    after = [z[0] for _, z, _ in fake.inputs[1:]] + [final]
    for i, e in enumerate(after):
        source = lat[STEPS - 1 - i]
        assert torch.equal(e[..., 5:], source[..., 5:]) == (i >= 1), i  # blend from int(5 * 0.2) = 1
        assert not (e[..., :5] == source[..., :5]).any(), i
    monkeypatch.undo()
    FakeEditUNet(monkeypatch)
    _, free, _ = _run(ws2, tiny, inv, regions={"bear": "tiger"}, region_blend=False)
    assert not torch.equal(free[..., 5:], lat[0][..., 5:])  # without the blend the wall moves


# ----------------------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def inverted(tiny, tmp_path_factory):
    """A real tiny inversion of a workspace whose one object `bear` is the disc (masks/edit)."""
    from test_edit import invert
    from stages.io.synthetic import moving_disc

    disc = moving_disc(4, 64, 64, seed=0)[1]
    ws = make_workspace(tmp_path_factory.mktemp("regions") / "ws", objects={"bear": (disc, "brown bear")})
    invert(ws, tiny)
    return ws


def _latent(ws, tiny, **kw):
    inv = load_inversion_for_edit(ws)
    job = plan_edit(ws, inv, EditConfig(**kw))
    return (job,) + edit_latents(ws, inv, tiny, job, Progress(quiet=True))


def test_one_region_gives_the_single_subject_edit_exactly(inverted, tiny):
    ws = inverted
    job_s, single, _ = _latent(ws, tiny, prompt="tiger")
    job_r, region, stats = _latent(ws, tiny, regions={"bear": "tiger"}, layout_steps=0.0, region_blend=False)
    assert job_r.target == job_s.target and job_r.name == job_s.name == "tiger" and job_r.mode == "regions"
    assert stats["calls"]["sa2"] > 0 and torch.equal(region, single)
    # the blend per object is the single-subject blend of the phrase's words
    r1 = run_edit(ws, EditConfig(prompt="tiger", blend=["brown", "bear", "tiger"], name="single"), models=tiny)
    r2 = run_edit(ws, EditConfig(regions={"bear": "tiger"}, layout_steps=0.0, name="region"), models=tiny)
    assert r1["resolved_prompt"] == r2["resolved_prompt"]
    assert np.array_equal(ws.read("edits/region/frames"), ws.read("edits/single/frames"))
    assert ws.group_attrs("edits/region")["params"]["regions"] == {"bear": "tiger"}
    _, laid, stats = _latent(ws, tiny, regions={"bear": "tiger"}, layout_steps=0.5, region_blend=False)
    assert stats["layout_steps"] == 1 and stats["calls"]["layout"] > 0 and not torch.equal(laid, region)


# ----------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def vd(*args):
    from vdcli.app import app

    return runner.invoke(app, ["edit", *map(str, args)])


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vd: error: ") and text in lines[0], result.stderr


@pytest.fixture(scope="module")
def cli_ws(inverted, tiny, tmp_path_factory):
    """The inverted workspace with two objects: bear (the disc) and wall (no stored phrase)."""
    from test_edit import copy_workspace, invert

    ws = copy_workspace(inverted, tmp_path_factory.mktemp("cli") / "ws")
    disc = np.asarray(ws.read("masks/objects/bear/raw"))
    write_objects(ws, {"bear": (disc, "brown bear"), "wall": (columns(4, 48, 64) * (1 - disc), None)})
    invert(ws, tiny, restart=True)  # masks/edit (the union) changed: the STDG inversion is redone from it
    return ws


def test_cli_region_edit_and_prompt_file(cli_ws, loads, tmp_path):
    r = vd(cli_ws.path, "--region", "bear=a tiger", "--region", "wall=a red brick wall", "--object",
           "wall=stone wall", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["resolved_prompt"] == TWO_TARGET and data["name"] == "tiger-red-brick"
    assert cli_ws.read("edits/tiger-red-brick/frames").shape == (4, 64, 64, 3)
    f = tmp_path / "edits.txt"
    f.write_text('# two edits\nregions: bear="a wolf"\nfox\n')
    r = vd(cli_ws.path, "--prompt-file", f, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert [e["name"] for e in json.loads(r.stdout)["edits"]] == ["wolf", "fox"] and loads == ["tiny", "tiny"]


def test_cli_bad_regions_one_line_errors_and_nothing_written(cli_ws, inverted, loads, tmp_path):
    from test_edit import copy_workspace

    def edits(path):
        return sorted(p.name for p in (path / "edits").iterdir()) if (path / "edits").exists() else []

    bare = copy_workspace(inverted, tmp_path / "bare")
    bare.remove("masks/objects")
    before = edits(cli_ws.path), edits(bare.path)
    ws = cli_ws.path
    one_line_error(vd(ws, "--region", "dog=cat"), 3, "unknown object 'dog'")
    one_line_error(vd(ws, "--region", "bear=tiger", "--region", "bear=wolf"), 2, "twice")
    one_line_error(vd(ws, "--region", "bear=tiger", "--object", "bear=polar bear"), 3, "not in the inversion prompt")
    one_line_error(vd(ws, "--region", "bear=tiger", "--region", "wall=lion", "--object", "wall=bear"), 3,
                   "name the same words")
    one_line_error(vd(ws, "--region", "wall=hedge"), 3, "--object wall=")
    one_line_error(vd(ws, "--region", "bear"), 2, "NAME=PHRASE")
    one_line_error(vd(ws, "--region", "bear=tiger", "--prompt", "tiger"), 2, "exactly one of")
    one_line_error(vd(ws, "--region", "bear=tiger", "--background"), 2, "--background")
    one_line_error(vd(ws, "--prompt", "tiger", "--object", "bear=bear"), 2, "--object")
    one_line_error(vd(ws, "--region", "bear=tiger", "--layout-steps", "2"), 2, "--layout-steps")
    one_line_error(vd(bare.path, "--region", "bear=tiger"), 3, "no named objects")
    assert (edits(cli_ws.path), edits(bare.path)) == before and loads == []
