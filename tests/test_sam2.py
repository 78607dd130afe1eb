"""SAM2: checkpoint lookup, config detection, and tracking plumbing with random weights (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.models import sam2_track as st
from stages.common.errors import InputError, ModelMissingError, UsageError
from stages.io.synthetic import moving_disc


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point every checkpoint location at empty temporary folders."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("VD_SAM2_DIR", str(tmp_path / "vd_sam2"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_checkpoint_table_names_files_hub_ids_and_urls():
    assert set(st.SAM2_CHECKPOINTS) == {"tiny", "small", "base_plus", "large"}
    large = st.SAM2_CHECKPOINTS["large"]
    assert large.filename == "sam2.1_hiera_large.pt" and large.hub_id == "facebook/sam2.1-hiera-large"
    assert large.url.endswith("/sam2.1_hiera_large.pt") and large.config == "configs/sam2.1/sam2.1_hiera_l.yaml"
    assert st.SAM2_CHECKPOINTS["base_plus"].hub_id == "facebook/sam2.1-hiera-base-plus"
    assert st.canonical_name("base") == "base_plus" and st.canonical_name("Tiny") == "tiny"


def test_find_checkpoint_in_each_location(empty_caches, monkeypatch):
    tmp = empty_caches
    assert st.find_sam2_checkpoint("tiny") is None and st.find_sam2_checkpoint("auto") is None
    own = tmp / "vd_sam2" / "sam2.1_hiera_small.pt"
    own.parent.mkdir()
    own.write_bytes(b"x")
    assert st.find_sam2_checkpoint("small") == own
    snapshot = tmp / "hf" / "models--facebook--sam2.1-hiera-tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "sam2.1_hiera_tiny.pt").write_bytes(b"x")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert st.find_sam2_checkpoint("tiny") == snapshot / "sam2.1_hiera_tiny.pt"
    cache = tmp / "xdg" / "vd" / "sam2" / "sam2.1_hiera_large.pt"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"x")
    assert st.find_sam2_checkpoint("auto") == cache  # largest available first
    assert st.find_sam2_checkpoint(str(own)) == own


def test_missing_weights_raise_model_missing_with_instructions(empty_caches):
    with pytest.raises(ModelMissingError) as err:
        st.resolve_checkpoint("auto")
    assert err.value.exit_code == 4 and "sam2.1_hiera_large.pt" in str(err.value)
    assert "https://" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError):
        st.resolve_checkpoint(str(empty_caches / "nope.pt"))
    with pytest.raises(UsageError):
        st.resolve_checkpoint("huge")
    assert st.resolve_checkpoint("random") is None


def _fake_state(embed: int, blocks: int, v21: bool) -> dict:
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(embed, 3, 1, 1)}
    state.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(blocks)})
    if v21:
        state["no_obj_embed_spatial"] = torch.zeros(1)
    return state


def test_config_is_detected_from_checkpoint_tensors(tmp_path):
    assert st._config_for_state(_fake_state(96, 12, True), tmp_path / "a.pt") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert st._config_for_state(_fake_state(144, 48, False), tmp_path / "a.pt") == "configs/sam2/sam2_hiera_l.yaml"
    assert st._config_for_state({}, tmp_path / "sam2.1_hiera_small.pt") == "configs/sam2.1/sam2.1_hiera_s.yaml"
    with pytest.raises(InputError):
        st._config_for_state({"x": torch.zeros(1)}, tmp_path / "a.pt")


@pytest.fixture(scope="module")
def predictor():
    return st.load_predictor(None, "cpu")


def test_random_predictor_is_cpu_float32_without_hole_filling(predictor):
    assert predictor.image_size == 256 and predictor.fill_hole_area == 0
    assert str(predictor.device) == "cpu"
    assert all(p.dtype == torch.float32 for p in predictor.parameters())


def test_tracking_propagates_both_ways_from_a_middle_frame(predictor, monkeypatch):
    video, _ = moving_disc(5, 64, 96)
    visited: list[tuple[bool, int]] = []
    memory_dtypes: list[torch.dtype] = []
    propagate = predictor.propagate_in_video
    single = predictor._run_single_frame_inference

    def spy_propagate(state, start_frame_idx=None, reverse=False, **kw):
        for item in propagate(state, start_frame_idx=start_frame_idx, reverse=reverse, **kw):
            visited.append((reverse, item[0]))
            yield item

    def spy_single(*args, **kwargs):
        out, masks = single(*args, **kwargs)
        if out.get("maskmem_features") is not None:
            memory_dtypes.append(out["maskmem_features"].dtype)
        return out, masks

    monkeypatch.setattr(predictor, "propagate_in_video", spy_propagate)
    monkeypatch.setattr(predictor, "_run_single_frame_inference", spy_single)
    masks = st.track(predictor, video, points=[(40.0, 30.0, 1), (5.0, 5.0, 0)], prompt_frame=2)
    assert masks.shape == (5, 64, 96) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert [i for r, i in visited if not r] == [2, 3, 4]
    assert [i for r, i in visited if r] == [2, 1, 0]
    assert memory_dtypes and all(d == torch.float32 for d in memory_dtypes)  # not SAM2's bf16 memory


def test_tracking_with_a_box_on_the_first_frame(predictor):
    video, _ = moving_disc(3, 64, 64)
    masks = st.track(predictor, video, box=(10, 10, 40, 40), prompt_frame=0)
    assert masks.shape == (3, 64, 64) and set(np.unique(masks)) <= {0, 1}
    with pytest.raises(UsageError):
        st.track(predictor, video, prompt_frame=0)


def test_a_saved_checkpoint_loads_with_its_detected_config(tmp_path, predictor):
    path = tmp_path / "my_sam.pt"
    torch.save({"model": predictor.state_dict()}, path)
    loaded = st.load_predictor(path, "cpu")
    assert loaded.image_size == 1024  # the real tiny config (checkpoints carry no image size)
    key = "image_encoder.trunk.patch_embed.proj.weight"
    assert torch.equal(loaded.state_dict()[key], predictor.state_dict()[key])
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(InputError):
        st.load_predictor(bad, "cpu")
