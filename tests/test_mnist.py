"""MNIST IDX loading: plain and gzip files, torchvision's layout, clear errors, the embedded subset."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tucker_ops.mnist import (
    MNIST_FILES,
    IdxFormatError,
    MnistFilesNotFound,
    find_mnist_dir,
    load_embedded,
    load_idx,
    load_mnist,
    normalize,
    write_idx,
)

REAL_MNIST = Path(os.environ.get("TUCKER_OPS_MNIST", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


def _write_split(folder: Path, split: str, n: int, *, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / (MNIST_FILES[split][0] + suffix), images)
    write_idx(folder / (MNIST_FILES[split][1] + suffix), labels)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_plain_and_gzip(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_split(tmp_path, "train", 7, gz=gz)
    _write_split(tmp_path, "test", 3, gz=gz, seed=1)
    split = load_mnist(tmp_path, "train")
    assert split.images.dtype == torch.uint8 and split.images.shape == (7, 28, 28)
    assert split.labels.dtype == torch.int64
    assert np.array_equal(split.images.numpy(), images)
    assert np.array_equal(split.labels.numpy(), labels.astype(np.int64))
    assert len(load_mnist(tmp_path, "test")) == 3


def test_idx_header_is_big_endian_and_exact(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x", np.arange(6, dtype=np.uint8).reshape(2, 3))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 2])
    assert struct.unpack(">II", raw[4:12]) == (2, 3)
    assert len(raw) == 12 + 6


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels-without-suffix", np.array([3, 1, 4], dtype=np.uint8), compress=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert load_idx(path).tolist() == [3, 1, 4]


def test_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_split(raw, "train", 4, gz=False)
    _write_split(raw, "test", 2, gz=True)
    assert find_mnist_dir(tmp_path) == raw
    assert len(load_mnist(tmp_path, "train")) == 4
    assert len(load_mnist(tmp_path, "test")) == 2


def test_missing_files_listed_by_name(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 2, gz=False)
    (tmp_path / (MNIST_FILES["test"][1])).unlink(missing_ok=True)
    with pytest.raises(MnistFilesNotFound) as info:
        find_mnist_dir(tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert ".gz" in message and str(tmp_path) in message
    # The training split alone is there, so loading it works.
    assert len(load_mnist(tmp_path, "train")) == 2


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MnistFilesNotFound, match="does not exist"):
        load_mnist(tmp_path / "nope", "train")


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_mnist(tmp_path, "validation")


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(IdxFormatError, match="bad magic number .*2051 for images"):
        load_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path: Path, gz: bool) -> None:
    full = write_idx(tmp_path / "full", np.zeros((5, 28, 28), dtype=np.uint8)).read_bytes()
    path = tmp_path / "short"
    cut = full[:-100]
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(IdxFormatError, match="truncated: header says shape \\(5, 28, 28\\)"):
        load_idx(path)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    data = write_idx(tmp_path / "a.gz", np.ones((50, 28, 28), dtype=np.uint8)).read_bytes()
    path = tmp_path / "b.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxFormatError, match="damaged or truncated gzip"):
        load_idx(path)


def test_images_and_labels_must_match(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 5, gz=False)
    write_idx(tmp_path / MNIST_FILES["train"][1], np.zeros(4, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="5 images but .* 4 labels"):
        load_mnist(tmp_path, "train")


def test_labels_out_of_range(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 3, gz=False)
    write_idx(tmp_path / MNIST_FILES["train"][1], np.array([1, 2, 11], dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="labels 0..9"):
        load_mnist(tmp_path, "train")


def test_normalize() -> None:
    x = normalize(torch.zeros(2, 28, 28, dtype=torch.uint8))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, -0.1307 / 0.3081))
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(2, 28, 28))


def test_embedded_subset_is_real_and_balanced() -> None:
    train, test = load_embedded("train"), load_embedded("test")
    assert train.images.shape == (10_000, 28, 28) and test.images.shape == (2_000, 28, 28)
    assert torch.bincount(train.labels).tolist() == [1000] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    # Real digits: mostly background with bright strokes (MNIST's mean pixel is about 0.13).
    mean = float(train.images.float().mean() / 255)
    assert 0.1 < mean < 0.16


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"full MNIST not found at {REAL_MNIST} (set TUCKER_OPS_MNIST)")
def test_real_mnist_matches_its_readme() -> None:
    test = load_mnist(REAL_MNIST, "test")
    assert test.images.shape == (10_000, 28, 28)
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
