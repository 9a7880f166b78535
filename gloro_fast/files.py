"""Files a long run can trust: atomic writes and hashed checkpoints.

Every file is written to a temporary file in the destination folder, flushed to disk
(fsync) and renamed over the destination, so a crash at any moment leaves either the old
file or the new one, never a truncated mix. A checkpoint carries the SHA-256 of its
content (every tensor's bytes, dtype and shape, every key and value), so a file damaged
after it was written is refused with a clear error instead of loading wrong weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Union

import torch

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "content_hash",
           "write_checkpoint", "read_checkpoint", "check_output_dir", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "gloro_fast.checkpoint.v2"

PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: PathLike, name: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove it writable (a file is created and removed), so a
    run fails before its first epoch rather than when it saves."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{name} {str(path)!r} is not a writable folder: {exc.strerror or exc}") from None
    return path


# --------------------------------------------------------------------------- content hash


def _update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(b"T" + str(t.dtype).encode() + struct.pack(f"<{t.dim() + 1}q", t.dim(), *t.shape))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _update(h, key)
            _update(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for item in obj:
            _update(h, item)
    elif isinstance(obj, (str, bytes)):
        data = obj.encode("utf-8") if isinstance(obj, str) else obj
        h.update((b"S" if isinstance(obj, str) else b"B") + struct.pack("<q", len(data)) + data)
    elif obj is None or isinstance(obj, (bool, int, float)):
        text = repr(obj).encode()
        h.update(b"P" + type(obj).__name__.encode() + struct.pack("<q", len(text)) + text)
    else:
        raise TypeError(f"cannot hash a {type(obj).__name__} in a checkpoint")


def content_hash(obj: Any) -> str:
    """SHA-256 (hex) of a nest of dicts, lists, tuples, tensors, strings and numbers,
    independent of how it is serialised."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


# --------------------------------------------------------------------------- checkpoints


def write_checkpoint(path: PathLike, payload: Dict[str, Any]) -> None:
    """Save ``payload`` (loadable with ``weights_only=True``) atomically, with its hash."""
    if "sha256" in payload or "format" in payload:
        raise ValueError("payload must not hold the reserved keys 'sha256' and 'format'")
    body = {"format": CHECKPOINT_FORMAT, **payload}
    body["sha256"] = content_hash(body)
    atomic_write(path, lambda f: torch.save(body, f))


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`write_checkpoint` onto the CPU, refusing (with a
    ``ValueError`` naming the file) anything that is not one, or whose hash does not match."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder, not a file "
                         "(a run folder holds model.pt and last.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure of an untrusted file means "not a checkpoint"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {str(path)!r} is truncated, corrupt or not a gloro_fast "
                         f"checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{str(path)!r} is not a gloro_fast checkpoint ({CHECKPOINT_FORMAT}); "
                         f"found format {found!r}")
    stored = ckpt.pop("sha256", None)
    try:
        actual = content_hash(ckpt)
    except TypeError as exc:
        raise ValueError(f"checkpoint {str(path)!r} holds unexpected content: {exc}") from None
    if stored != actual:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: its content hash does not match "
                         f"(stored {str(stored)[:16]}…, computed {actual[:16]}…)")
    return ckpt
