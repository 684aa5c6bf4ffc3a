"""Build the MNIST subset shipped in ``tucker_ops/data/mnist-subset/`` from the full data set.

    .venv/bin/python scripts/make_mnist_subset.py ../shared/data/mnist

The subset is class-balanced and fixed: for each digit, the first ``PER_CLASS_*``
images of that digit in a permutation drawn with numpy's ``default_rng(SEED)``,
then shuffled with the same generator. Running the script again writes the same
bytes (gzip without timestamps), so the files can be checked against their source.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tucker_ops.mnist import EMBEDDED_DIR, MNIST_FILES, load_mnist, write_idx  # noqa: E402

SEED = 20240607
PER_CLASS_TRAIN = 1000
PER_CLASS_TEST = 200

README = """# Embedded MNIST subset

A small, class-balanced sample of the real MNIST handwritten-digit database, so that
`tucker-ops demo` (and `make demo`) train and test on real digits on a fresh machine
without a download. The full data set comes in through `tucker-ops reproduce --data DIR`.

| file | contents |
| --- | --- |
{rows}
Made by `scripts/make_mnist_subset.py` (seed {seed}: {train} training images per digit from
the 60,000 training images, {test} test images per digit from the 10,000 test images).
The files are standard gzip-compressed IDX, read by `tucker_ops.mnist.load_embedded()`.

Source and license: MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges,
<http://yann.lecun.com/exdb/mnist/>, licensed under Creative Commons Attribution-Share
Alike 3.0 (CC BY-SA 3.0). This subset is a derived work under the same license.
"""


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices: ``per_class`` of each digit, from one seeded permutation, then shuffled."""
    order = rng.permutation(len(labels))
    picked = np.concatenate([order[labels[order] == digit][:per_class] for digit in range(10)])
    return picked[rng.permutation(len(picked))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with the full MNIST IDX files")
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR, help=f"output folder (default: {EMBEDDED_DIR})")
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, per_class in (("train", PER_CLASS_TRAIN), ("test", PER_CLASS_TEST)):
        data = load_mnist(args.source, split)
        index = balanced_subset(data.labels.numpy(), per_class, rng)
        images = data.images.numpy()[index]
        labels = data.labels.numpy()[index].astype(np.uint8)
        for stem, array in zip(MNIST_FILES[split], (images, labels)):
            path = write_idx(args.out / f"{stem}.gz", array)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            shape = " × ".join(str(d) for d in array.shape)
            rows.append(f"| {path.name} | {shape} uint8, {path.stat().st_size:,} bytes, sha256 {digest}… |")
            print(f"wrote {path} ({shape}, {path.stat().st_size:,} bytes)")
    (args.out / "README.md").write_text(README.format(rows="\n".join(rows) + "\n", seed=SEED, train=PER_CLASS_TRAIN, test=PER_CLASS_TEST))
    return 0


if __name__ == "__main__":
    sys.exit(main())
