import os

import pytest
import torch

from gce.errors import CheckpointError
from gce.io import write_checksum
from gce.training.checkpoint import LAST, PREVIOUS, load_checkpoint, save_checkpoint


def state(value: float) -> dict:
    return {"epoch": int(value), "model": {"w": torch.full((3,), value)}, "rng": (1, (2, 3), None)}


def test_round_trip_keeps_previous(tmp_path):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    loaded, path = load_checkpoint(tmp_path)
    assert path.name == LAST and loaded["epoch"] == 2
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 2.0))
    previous, _ = load_checkpoint(tmp_path / PREVIOUS)
    assert previous["epoch"] == 1
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "zero"])
def test_damaged_last_falls_back_to_previous_with_message(tmp_path, damage):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    last = tmp_path / LAST
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    last.write_bytes(bytes(data))
    messages = []
    loaded, path = load_checkpoint(tmp_path, warn=messages.append)
    assert path.name == PREVIOUS and loaded["epoch"] == 1
    assert len(messages) == 1 and "falling back" in messages[0] and LAST in messages[0]


def test_kill_between_renames_still_loads(tmp_path):
    # A SIGKILL after last.pt was moved to prev.pt but before the new file was renamed in.
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    os.replace(tmp_path / LAST, tmp_path / PREVIOUS)
    os.replace(tmp_path / f"{LAST}.sha256", tmp_path / f"{PREVIOUS}.sha256")
    loaded, path = load_checkpoint(tmp_path)
    assert path.name == PREVIOUS and loaded["epoch"] == 2


def test_no_checkpoint_and_all_damaged(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / LAST).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no checksum file last\.pt\.sha256 beside it, so it cannot be verified"):
        load_checkpoint(tmp_path)
    write_checksum(tmp_path / LAST)  # garbage that matches its checksum: not a loadable checkpoint
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "state": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError, match="cannot be verified"):  # refused before unpickling
        load_checkpoint(path)
    write_checksum(path)  # even with a valid checksum, the weights-only loader refuses the callable
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_a_checkpoint_from_before_a_schema_key_existed_resumes_under_that_key_s_default():
    from gce.config import load_config
    from gce.training.checkpoint import changed_settings, setting_differences

    cfg = load_config(None, ["data.dataset=emoji", "data.root=x"]).to_dict()
    older = {section: dict(values) if isinstance(values, dict) else values for section, values in cfg.items()}
    del older["loss"]["name"], older["model"]["block"]  # keys added after that checkpoint was written
    assert setting_differences(older, cfg) == []
    del older["train"]["trackers"]
    assert changed_settings(older, cfg) == []  # nothing to say aloud on resume either
    cfg["train"]["trackers"] = []
    assert changed_settings(older, cfg) == ["train.trackers: ['tensorboard'] -> []"]
    cfg["model"]["block"] = "none"
    assert setting_differences(older, cfg) == ["model.block: checkpoint 'conv3x3', config 'none'"]
