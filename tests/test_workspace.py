"""The workspace: schema, atomic whole-array writes, names that cannot escape, clip identity."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.errors import InputError
from stages.io.workspace import SCHEMA, Workspace, check_name


def test_create_writes_schema_and_source(tmp_path):
    ws = Workspace.create(tmp_path / "ws", {"sha256": "abc", "frames": 4})
    again = Workspace.open(tmp_path / "ws")
    assert again.attrs["schema"] == SCHEMA
    assert again.attrs["source"]["sha256"] == "abc"
    assert ws.path == again.path


def test_whole_array_write_replaces_atomically_and_leaves_no_temp(tmp_path):
    ws = Workspace.create(tmp_path / "ws", {"sha256": "abc"})
    ws.write_array("masks/raw", np.zeros((2, 4, 4), np.uint8))
    ws.write_array("masks/raw", np.ones((3, 4, 4), np.uint8), attrs={"source": "test"})
    arr = ws.array("masks/raw")
    assert arr.shape == (3, 4, 4) and int(arr[...].sum()) == 48
    assert dict(arr.attrs) == {"source": "test"}
    assert not any((tmp_path / "ws" / ".tmp").iterdir())


def test_other_clip_is_refused_without_force(tmp_path):
    Workspace.create(tmp_path / "ws", {"sha256": "abc", "path": "a.mp4"}).write_array("x", np.ones(3))
    with pytest.raises(InputError, match="another clip"):
        Workspace.create(tmp_path / "ws", {"sha256": "def", "path": "b.mp4"})
    assert Workspace.open(tmp_path / "ws").has("x")
    ws = Workspace.create(tmp_path / "ws", {"sha256": "def", "path": "b.mp4"}, force=True)
    assert not ws.has("x")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", ".hidden", "a b", ""])
def test_names_cannot_escape_the_workspace(bad):
    with pytest.raises(InputError):
        check_name(bad)


def test_open_refuses_non_workspace(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a vd workspace"):
        Workspace.open(tmp_path / "plain")
    with pytest.raises(InputError, match="not found"):
        Workspace.open(tmp_path / "missing")


def test_step_arrays_fill_chunk_by_chunk(tmp_path):
    ws = Workspace.create(tmp_path / "ws", {"sha256": "abc"})
    arr = ws.create_array("inversion/latents", (3, 2, 4), "float32", chunks=(1, 2, 4))
    arr[1] = np.full((2, 4), 7.0, np.float32)
    reopened = Workspace.open(tmp_path / "ws").read("inversion/latents")
    assert reopened[1].max() == 7.0 and reopened[0].max() == 0.0
