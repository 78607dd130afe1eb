"""Presets and configs: sections per stage, unknown settings refused, safe YAML."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from stages.common.config import build_config, changed_settings, config_hash, preset_names, preset_section
from stages.common.errors import InputError


@dataclass
class Demo:
    steps: int = 50
    cfg: float = 7.5


def test_each_stage_reads_its_own_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("invert:\n  steps: 20\nedit:\n  tau_s: 0.5\n")
    assert preset_section(str(path), "invert") == {"steps": 20}
    assert preset_section(str(path), "edit") == {"tau_s": 0.5}
    assert preset_section(str(path), "eval") == {}


def test_a_preset_without_sections_is_taken_whole(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("steps: 20\nreweight: {tiger: 2}\n")
    assert preset_section(str(path), "edit") == {"steps": 20, "reweight": {"tiger": 2}}


def test_shipped_presets_load_and_unknown_ones_are_refused():
    assert {"default", "foreground", "background", "fast", "bear", "wolf"} <= set(preset_names())
    assert preset_section("background", "edit")["background"] is True
    with pytest.raises(InputError, match="unknown preset"):
        preset_section("no-such-preset", "invert")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("invert: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        preset_section(str(path), "invert")


def test_flags_override_presets_and_unknown_settings_are_named():
    cfg = build_config(Demo, {"steps": 20, "cfg": 5.0}, {"steps": 10, "cfg": None})
    assert (cfg.steps, cfg.cfg) == (10, 5.0)
    with pytest.raises(InputError, match="unknown setting 'stpes'"):
        build_config(Demo, {"stpes": 3})


def test_changed_settings_are_listed_and_hashes_follow_values():
    assert changed_settings({"steps": 50, "cfg": 7.5}, {"steps": 20, "cfg": 7.5}) == ["steps"]
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 1, "b": 3})
