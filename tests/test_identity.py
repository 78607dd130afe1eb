"""Model identity from full content (stages.models.identity): a change in a middle tensor is seen, a rename
is not, Hugging Face blobs are read (an edited blob is seen), digests are cached by file stat including the
ctime (content replaced with the mtime restored is seen), every shard counts, only the files from_pretrained
reads count (a `.orig.safetensors` backup does not), the identity found without loading equals load_models'
own, and an old-format identity gets one clear line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import model_files
from file_faults import cache, cache_everything, replace_keeping_stat  # noqa: F401 (fixtures)

MIB = 1 << 20


def _flip_middle(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: the file stays loadable
    return bytes(data)


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


def _hub_link(tmp_path: Path, content: bytes) -> tuple[Path, Path]:
    """A Hugging Face cache layout: snapshots/<rev>/unet/<file> -> ../../../blobs/<sha256 of content>."""
    repo = tmp_path / "hub" / "models--org--model"
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(content)
    link = repo / "snapshots" / "abc123" / "unet" / "diffusion_pytorch_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return blob, link


def test_hub_blob_is_read_not_trusted_by_its_name(tmp_path):
    from stages.models.identity import file_sha256, fingerprint

    path = _save(tmp_path / "w.safetensors", _layers())
    blob, link = _hub_link(tmp_path, path.read_bytes())
    assert file_sha256(link) == blob.name  # an intact blob: its content hash is its name
    before = fingerprint("k", [link], [])
    replace_keeping_stat(blob, _flip_middle(blob))  # edited in place, name and mtime kept
    assert file_sha256(link) == hashlib.sha256(blob.read_bytes()).hexdigest() != blob.name
    assert fingerprint("k", [link], []) != before


def test_hub_blob_edit_is_seen_through_the_cache(tmp_path, cache, cache_everything):
    from stages.models.identity import file_sha256

    blob, link = _hub_link(tmp_path, b"weights" * 1000)
    assert file_sha256(link) == blob.name and len(list(cache.iterdir())) == 1
    replace_keeping_stat(blob, b"Weights" * 1000)
    assert file_sha256(link) == hashlib.sha256(b"Weights" * 1000).hexdigest()


def test_digest_is_computed_once_and_cached_by_stat(tmp_path, cache, cache_everything):
    from stages.models.identity import file_sha256

    path = tmp_path / "w.bin"
    path.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == real
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].read_text() == real
    entries[0].write_text("0" * 64)  # a cached digest is trusted while dev, inode, size, mtime and ctime stay
    assert file_sha256(path) == "0" * 64
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_sha256(path) == real
    for entry in cache.iterdir():
        entry.write_text("0" * 64)
    replace_keeping_stat(path, b"WEIGHTS" * 1000)  # content replaced, size and mtime restored
    assert file_sha256(path) == hashlib.sha256(b"WEIGHTS" * 1000).hexdigest()


def test_content_replaced_with_mtime_restored_gives_a_new_identity(tmp_path):
    from stages.models.identity import fingerprint

    path = _save(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", _layers())
    before = fingerprint("k", [path], [])
    replace_keeping_stat(path, _flip_middle(path))
    assert fingerprint("k", [path], []) != before


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


def _perturbed(path: Path, key: str, delta: float) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(path))
    state[key] = state[key] + delta
    return state


def test_a_backup_beside_the_real_file_is_not_hashed(tmp_path, monkeypatch):
    from stages.models.load import load_models
    from stages.models.resolve import model_identity

    parts = model_files.tiny_parts()
    sd = model_files.write_config_folder(tmp_path / "sd", parts)
    monkeypatch.setenv("VD_MOTION_ADAPTER", str(model_files.write_adapter_folder(tmp_path / "adapter", parts)))
    real = sd / "unet" / "diffusion_pytorch_model.safetensors"
    key = "conv_out.bias"
    before = model_identity(str(sd))
    _save(sd / "unet" / "diffusion_pytorch_model.orig.safetensors", _perturbed(real, key, 1.0))
    _save(sd / "text_encoder" / "model.orig.safetensors",
          _perturbed(sd / "text_encoder" / "model.safetensors", "final_layer_norm.bias", 1.0))
    assert model_identity(str(sd)) == before  # backups are never loaded, so they never count
    _save(real, _perturbed(real, key, 0.5))  # the file diffusers loads changed
    changed = model_identity(str(sd))
    assert changed != before
    models = load_models(str(sd), device="cpu")
    assert models.fingerprint == changed
    loaded = dict(models.unet.named_parameters())[key]
    torch.testing.assert_close(loaded, parts[0].conv_out.bias + 0.5)


def test_component_files_are_the_ones_from_pretrained_reads(tmp_path):
    """For each layout, the files `component` names are the ones whose weights the loader ends up with."""
    from stages.models.load import _from_pretrained
    from stages.models.resolve import component

    vae = model_files.tiny_parts()[2]
    key = "decoder.conv_out.bias"
    base = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}

    def write(folder: Path, name: str, delta: float) -> Path:
        state = dict(base, **{key: base[key] + delta})
        if name.endswith(".bin"):
            torch.save(state, folder / name)
            return folder / name
        return _save(folder / name, state)

    layouts = {  # file name -> the offset it carries; the expected winner, its variant
        "safetensors over bin and a backup": ({"diffusion_pytorch_model.safetensors": 1.0,
                                                "diffusion_pytorch_model.orig.safetensors": 2.0,
                                                "diffusion_pytorch_model.bin": 3.0,
                                                "diffusion_pytorch_model.fp16.safetensors": 4.0},
                                               "diffusion_pytorch_model.safetensors", None),
        "full-precision bin over an fp16 variant": ({"diffusion_pytorch_model.bin": 3.0,
                                                      "diffusion_pytorch_model.fp16.safetensors": 4.0,
                                                      "a.safetensors": 5.0},
                                                     "diffusion_pytorch_model.bin", None),
        "the fp16 variant when it is all there is": ({"diffusion_pytorch_model.fp16.safetensors": 4.0,
                                                      "diffusion_pytorch_model.orig.safetensors": 2.0},
                                                     "diffusion_pytorch_model.fp16.safetensors", "fp16"),
    }
    for what, (files, winner, variant) in layouts.items():
        root = tmp_path / what.replace(" ", "-")
        vae.save_pretrained(root / "vae")
        (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        for name, delta in files.items():
            write(root / "vae", name, delta)
        found = component(root, "vae")
        assert found is not None and found.files == (root / "vae" / winner,) and found.variant == variant, what
        loaded = _from_pretrained(type(vae), root, "vae").state_dict()[key]
        torch.testing.assert_close(loaded, base[key] + files[winner], msg=what)
    # a sharded checkpoint: the shards its index names, then the index; a stray single file is not read
    sharded = tmp_path / "sharded"
    vae.save_pretrained(sharded / "vae", max_shard_size="200KB")
    index = sharded / "vae" / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 1
    write(sharded / "vae", "diffusion_pytorch_model.safetensors", 1.0)
    assert component(sharded, "vae").files == tuple(sharded / "vae" / n for n in shards) + (index,)
    torch.testing.assert_close(_from_pretrained(type(vae), sharded, "vae").state_dict()[key], base[key])
    assert component(tmp_path / "nothing", "vae") is None


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
