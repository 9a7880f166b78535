"""Small dataset files in the real on-disk formats, for training and CLI tests."""
import gzip
import struct

import numpy as np


def write_mnist(folder, n_train=256, n_test=64, size=28, seed=0, gz=False):
    """The four MNIST IDX files with random digits whose label is readable from the image
    (a bright square at a class-dependent place), so a few epochs learn something."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 4)
            images[i, 2 + 6 * r: 6 + 6 * r, 2 + 6 * c: 6 + 6 * c] = 255
        blobs = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, size, size) + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes()}
        for name, blob in blobs.items():
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
    return folder
