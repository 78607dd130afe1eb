"""Model identity from full content (stages.models.identity): a change in a middle tensor is seen, a rename
is not, Hugging Face blob names are used as digests, digests are cached by file stat, every shard counts,
the identity found without loading equals load_models' own, and an old-format identity gets one clear line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import model_files

MIB = 1 << 20


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "vd" / "file-sha256"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _old_signature(path: Path) -> str:
    """What older vd hashed: the size and the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(MIB))
        fh.seek(max(size - MIB, MIB))
        h.update(fh.read(MIB))
    return h.hexdigest()[:16]


def _layers() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(3 * MIB // 8, generator=gen) for i in range(3)}  # 1.5 MiB each


def test_middle_tensor_change_is_seen_and_a_rename_is_not(tmp_path):
    from stages.models.identity import fingerprint

    layers = _layers()
    path = _save(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors", layers)
    before, old_before = fingerprint("k", [path], []), _old_signature(path)
    merged = dict(layers, **{"layer1.weight": layers["layer1.weight"].clone()})
    merged["layer1.weight"][1000:1100] += 0.01  # a LoRA merged into a middle layer
    _save(path, merged)
    assert _old_signature(path) == old_before  # the old partial hash could not see it
    changed = fingerprint("k", [path], [])
    assert changed != before and changed.startswith("k-v2-")
    renamed = path.parent / "renamed.safetensors"
    path.rename(renamed)
    assert fingerprint("k", [renamed], []) == changed
    moved = tmp_path / "elsewhere" / "unet" / "x.safetensors"
    moved.parent.mkdir(parents=True)
    renamed.rename(moved)
    assert fingerprint("k", [moved], []) == changed
    # the component still counts: the same bytes as the VAE are another model
    vae = moved.parent.parent / "vae" / "x.safetensors"
    vae.parent.mkdir()
    moved.rename(vae)
    assert fingerprint("k", [vae], []) != changed


def test_hub_blob_name_is_the_digest(tmp_path):
    from stages.models.identity import file_sha256

    repo = tmp_path / "hub" / "models--org--model"
    name = hashlib.sha256(b"the real content").hexdigest()
    blob = repo / "blobs" / name
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not what the name says")  # read, it would hash to something else
    link = repo / "snapshots" / "abc123" / "unet" / "diffusion_pytorch_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert file_sha256(link) == name


def test_digest_is_computed_once_and_cached_by_stat(tmp_path, cache):
    from stages.models.identity import file_sha256

    path = tmp_path / "w.bin"
    path.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == real
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].read_text() == real
    entries[0].write_text("0" * 64)  # a cached digest is trusted while size and mtime stay
    assert file_sha256(path) == "0" * 64
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_sha256(path) == real


def test_every_shard_and_the_index_count(tmp_path):
    from stages.models.identity import fingerprint, shard_files

    folder = tmp_path / "unet"
    first = _save(folder / "diffusion_pytorch_model-00001-of-00002.safetensors", {"a": torch.zeros(4)})
    second = _save(folder / "diffusion_pytorch_model-00002-of-00002.safetensors", {"b": torch.zeros(4)})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": first.name, "b": second.name}}))
    assert shard_files(first) == [first, second, index]
    before = fingerprint("k", [first], [])
    _save(second, {"b": torch.ones(4)})
    assert fingerprint("k", [first], []) != before


def test_identity_without_loading_equals_load_models(tmp_path, monkeypatch):
    from stages.models.resolve import model_identity
    from stages.models.load import load_models

    assert model_identity("tiny") == load_models("tiny", device="cpu").fingerprint
    parts = model_files.tiny_parts()
    sd = model_files.write_config_folder(tmp_path / "sd", parts)
    adapter = model_files.write_adapter_folder(tmp_path / "adapter", parts)
    monkeypatch.setenv("VD_MOTION_ADAPTER", str(adapter))
    ident = model_identity(str(sd))
    assert ident == load_models(str(sd), device="cpu").fingerprint and ident.startswith("sd15-animatediff-v2-")
    single = model_files.write_single_file(tmp_path / "sd.safetensors", parts)
    ckpt = model_files.write_original_motion_module(tmp_path / "mm.ckpt", parts)
    monkeypatch.setenv("VD_MOTION_ADAPTER", str(ckpt))
    monkeypatch.setenv("VD_SD15_CONFIG", str(sd))
    assert model_identity(str(single)) == load_models(str(single), device="cpu").fingerprint


def test_edit_names_an_old_format_identity_in_one_line(tmp_path, tiny):
    from stages.common.errors import InputError
    from stages.edit.run import EditConfig, run_edit
    from stages.invert import InvertConfig, run_invert
    from stages.models.identity import is_legacy
    from conftest import make_workspace

    assert is_legacy("sd15-animatediff-0123456789abcdef") and not is_legacy("sd15-animatediff-v2-" + "0" * 20)
    assert not is_legacy(tiny.fingerprint)
    ws = make_workspace(tmp_path / "w.vd")
    from stages.common.progress import Progress

    run_invert(ws, InvertConfig(prompt="a red disc", model="tiny", steps=2, null_steps=1, device="cpu"),
               Progress(quiet=True), models=tiny)
    ws.update_attrs("inversion", model={"spec": "sd15-animatediff-v3", "fingerprint": "sd15-animatediff-" + "a" * 16})
    with pytest.raises(InputError) as err:
        run_edit(ws, EditConfig(prompt="a blue disc"), Progress(quiet=True), models=tiny)
    message = str(err.value)
    assert "older vd model identity" in message and "--restart" in message and "\n" not in message
