"""Atomic writes, output-folder checks and hashed checkpoints."""
import os
import stat

import pytest
import torch

from gloro_fast.files import (
    CHECKPOINT_FORMAT,
    atomic_write,
    atomic_write_text,
    check_output_dir,
    content_hash,
    read_checkpoint,
    write_checkpoint,
)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new content\n")
    assert path.read_text() == "new content\n"
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as a plain open() would


def test_crash_during_write_keeps_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    atomic_write_text(path, "previous")

    def half_then_crash(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt  # as a kill between the first bytes and the rename

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "previous"
    assert leftovers(tmp_path) == []


def test_check_output_dir(tmp_path):
    made = check_output_dir(tmp_path / "a" / "b")
    assert made.is_dir()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_dir(a_file)
    with pytest.raises(ValueError, match="not a writable folder"):
        check_output_dir(a_file / "sub")  # its parent is a file
    with pytest.raises(ValueError, match="not a writable folder"):
        check_output_dir("/sys/gloro_fast_run")  # read-only file system, even for root


def test_content_hash_sees_every_bit_and_ignores_key_order():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": 3, "s": "x", "l": [1.5, None]}
    b = {"l": [1.5, None], "s": "x", "n": 3, "w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert content_hash(a) == content_hash(b)
    flipped = a["w"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of one weight
    assert content_hash({**a, "w": flipped}) != content_hash(a)
    assert content_hash({**a, "w": a["w"].double()}) != content_hash(a)          # dtype
    assert content_hash({**a, "w": a["w"].reshape(3, 2)}) != content_hash(a)     # shape
    assert content_hash({**a, "n": 3.0}) != content_hash(a)                      # int vs float
    assert content_hash({**a, "l": (1.5, None)}) != content_hash(a)              # list vs tuple
    with pytest.raises(TypeError, match="object"):
        content_hash({"x": object()})


def _payload():
    torch.manual_seed(0)
    return {"state_dict": {"w": torch.randn(64, 64), "u": torch.randn(64)}, "epoch": 3,
            "config": {"arch": "2C2F", "epsilon": 0.3}}


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    write_checkpoint(path, _payload())
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["epoch"] == 3
    assert torch.equal(ckpt["state_dict"]["w"], _payload()["state_dict"]["w"])
    with pytest.raises(ValueError, match="reserved"):
        write_checkpoint(path, {"sha256": "x"})


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "flipped"])
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    path = tmp_path / "c.pt"
    write_checkpoint(path, _payload())
    blob = bytearray(path.read_bytes())
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "empty":
        blob = bytearray()
    elif damage == "random":
        blob = bytearray(torch.randint(0, 256, (len(blob),), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8).numpy().tobytes())
    else:
        # One bit inside the weight data: find w's bytes in the archive and flip one.
        raw = _payload()["state_dict"]["w"].numpy().tobytes()
        at = bytes(blob).find(raw[4096:4160])
        assert at > 0
        blob[at + 3] ^= 0x10
    path.write_bytes(bytes(blob))
    message = {"truncated": "truncated, corrupt", "empty": "is empty", "random": "truncated, corrupt",
               "flipped": "corrupt"}[damage]
    with pytest.raises(ValueError, match=message) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"hello": 1}, foreign)
    with pytest.raises(ValueError, match="not a gloro_fast checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(ValueError, match="is a folder"):
        read_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    # A well-formed file whose stored hash was not computed from its content.
    forged = tmp_path / "forged.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "sha256": "0" * 64}, forged)
    with pytest.raises(ValueError, match="content hash does not match"):
        read_checkpoint(forged)
