"""MNIST in IDX format: the real files from a folder, or the small subset shipped with the package.

The loader reads the four standard files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``),
plain or gzip-compressed (``.gz``), from the given folder or from torchvision's layout
below it (``MNIST/raw/``). Nothing is downloaded.

The embedded subset (``tucker_ops/data/mnist-subset/``, same IDX format) is a fixed,
class-balanced sample of the real MNIST made by ``scripts/make_mnist_subset.py``:
MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, license CC BY-SA 3.0.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "EMBEDDED_DIR",
    "IdxFormatError",
    "MnistFilesNotFound",
    "MnistSplit",
    "find_mnist_dir",
    "load_embedded",
    "load_idx",
    "load_mnist",
    "normalize",
    "read_idx_bytes",
    "write_idx",
]

#: split -> (images file, labels file), without the optional ``.gz``.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Mean and standard deviation of the 60,000 training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "mnist-subset"

# IDX type codes -> numpy big-endian dtypes (the format stores everything big-endian).
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxFormatError(ValueError):
    """An IDX file whose header or length is not what the format requires."""


class MnistFilesNotFound(FileNotFoundError):
    """The MNIST folder lacks one or more of the expected files (the message lists them)."""


@dataclass(frozen=True)
class MnistSplit:
    """One split of MNIST.

    Attributes:
        images: uint8 ``(N, 28, 28)``.
        labels: int64 ``(N,)`` in 0..9.
        source: the folder the files were read from.
    """

    images: Tensor
    labels: Tensor
    source: str

    def __len__(self) -> int:
        return int(self.labels.numel())

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(normalize(images) (N, 1, 28, 28) float32, labels (N,) int64)``."""
        return normalize(self.images), self.labels


def normalize(images: Tensor) -> Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)``, scaled to [0, 1] then standardised."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"normalize: expected images as uint8 (N, H, W), but got {images.dtype} {tuple(images.shape)}")
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


# -- IDX ------------------------------------------------------------------------------


def read_idx_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX content (already decompressed) into a numpy array of its declared shape.

    Raises:
        IdxFormatError: bad magic number, unknown type code, or a length that does not
            match the header's dimensions (a truncated or padded file).
    """
    if len(data) < 4:
        raise IdxFormatError(f"{name}: expected an IDX header of at least 4 bytes, but the file has {len(data)}")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        magic = struct.unpack(">I", data[:4])[0]
        raise IdxFormatError(
            f"{name}: bad magic number {magic} (0x{magic:08x}); expected an IDX file: "
            "2051 for images (idx3-ubyte), 2049 for labels (idx1-ubyte). "
            "Is it gzip-compressed without a .gz name, or not an MNIST file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{name}: truncated header: expected {header} bytes for {ndim} dimensions, got {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise IdxFormatError(f"{name}: {what}: header says shape {shape} ({expected:,} bytes), but the file has {len(data):,} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file, plain or gzip (by content, whatever its name)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IdxFormatError(f"{path}: damaged or truncated gzip data ({err})") from None
    return read_idx_bytes(raw, str(path))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8, or another IDX type) as an IDX file; gzip when ``compress`` or the name ends in ``.gz``."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"write_idx: expected an array of an IDX type ({sorted(str(d) for d in codes)}), but got {array.dtype}")
    header = struct.pack(">HBB", 0, codes[native], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(native.newbyteorder(">")).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        # mtime=0 keeps the bytes identical from run to run.
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return path


# -- MNIST folders -------------------------------------------------------------------


def _candidates(root: Path) -> list[Path]:
    return [root, root / "MNIST" / "raw", root / "raw"]


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_mnist_dir(root: str | os.PathLike[str], splits: tuple[str, ...] = ("train", "test")) -> Path:
    """The folder under ``root`` that holds the MNIST files of ``splits``.

    Looks in ``root``, ``root/MNIST/raw`` (torchvision) and ``root/raw``.

    Raises:
        MnistFilesNotFound: naming the folders searched and the files expected there.
    """
    root = Path(root)
    if not root.is_dir():
        raise MnistFilesNotFound(f"MNIST folder {str(root)!r} does not exist or is not a directory")
    stems = [stem for split in splits for stem in MNIST_FILES[split]]
    best: tuple[Path, list[str]] | None = None
    for folder in _candidates(root):
        if not folder.is_dir():
            continue
        missing = [stem for stem in stems if _file_in(folder, stem) is None]
        if not missing:
            return folder
        if best is None or len(missing) < len(best[1]):
            best = (folder, missing)
    folder, missing = best if best is not None else (root, stems)
    searched = ", ".join(str(f) for f in _candidates(root))
    raise MnistFilesNotFound(
        f"MNIST files missing in {str(folder)!r}: {', '.join(missing)} (each plain or with .gz). "
        f"Expected all of: {', '.join(stems)}. Searched: {searched}"
    )


def load_mnist(root: str | os.PathLike[str], split: str) -> MnistSplit:
    """Load the ``"train"`` or ``"test"`` split from the real MNIST files under ``root``.

    Raises:
        ValueError: unknown split.
        MnistFilesNotFound: files missing (the message lists the expected names).
        IdxFormatError: a file that is not valid IDX, or images and labels that do not match.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"load_mnist: expected split 'train' or 'test', but got {split!r}")
    folder = find_mnist_dir(root, (split,))
    image_path = _file_in(folder, MNIST_FILES[split][0])
    label_path = _file_in(folder, MNIST_FILES[split][1])
    assert image_path is not None and label_path is not None  # find_mnist_dir checked
    images = load_idx(image_path)
    labels = load_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(f"{image_path}: expected uint8 images (N, H, W), but got {images.dtype} with shape {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IdxFormatError(f"{label_path}: expected uint8 labels (N,), but got {labels.dtype} with shape {labels.shape}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{folder}: {image_path.name} holds {len(images)} images but {label_path.name} {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise IdxFormatError(f"{label_path}: expected labels 0..9, but found {int(labels.max())}")
    return MnistSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), str(folder))


def load_embedded(split: str) -> MnistSplit:
    """The MNIST subset shipped with the package (see ``tucker_ops/data/mnist-subset/README.md``)."""
    return load_mnist(EMBEDDED_DIR, split)
