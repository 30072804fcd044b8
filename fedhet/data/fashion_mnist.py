"""Fashion-MNIST from its four IDX files (plain or gzip), as Debian's ``dataset-fashion-mnist`` installs."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from fedhet.data.base import DATASETS, Dataset
from fedhet.errors import DataError

__all__ = ["DEFAULT_ROOT", "MEAN", "STD", "load_fashion_mnist", "read_idx"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
MEAN = 0.2860  # mean pixel of the training images, after scaling to [0, 1]
STD = 0.3530  # pixel standard deviation of the training images, after scaling to [0, 1]
_INSTALL_HINT = "install it with: apt-get install -y dataset-fashion-mnist (or set dataset.root)"
_UBYTE = 0x08  # IDX type code of unsigned bytes
_SIDE = 28  # image height and width, in pixels


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Parse one IDX file of unsigned bytes, gzip-compressed when its name ends in ``.gz``.

    The header is two zero bytes, the type code (0x08), the number of dims, then each dim as a big-endian
    uint32; the data follow, row-major. Raises DataError naming the file when it is unreadable or malformed.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path} not found; {_INSTALL_HINT}") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        magic = int.from_bytes(raw[:4], "big")
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x} (must start with two zero bytes)")
    if raw[2] != _UBYTE:
        raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header with {ndim} dims is missing or truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: dims {dims} need {expected} data bytes, found {len(raw) - header} (truncated or padded)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, name: str) -> Path:
    """The plain file ``root/name`` if present, else ``root/name.gz``."""
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return path
    raise DataError(f"Fashion-MNIST file {root / name}[.gz] not found; {_INSTALL_HINT}")


def _load_split(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as normalized float32 (N, 1, 28, 28) and labels as int64 (N,) of the split ``prefix``."""
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (_SIDE, _SIDE):
        raise DataError(f"{images_path}: expected images of dims (N, 28, 28), found {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of dims (N,), found {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: labels must be in 0..9, found {int(labels.max())}")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x.mul_(1.0 / 255.0).sub_(MEAN).div_(STD)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT) -> Dataset:
    """Load Fashion-MNIST (60000 train, 10000 test) from the IDX files in ``root``; nothing is cached."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} not found; {_INSTALL_HINT}")
    x_train, y_train = _load_split(root, "train")
    x_test, y_test = _load_split(root, "t10k")
    return Dataset("fashion_mnist", x_train, y_train, x_test, y_test, num_classes=10)


DATASETS.register("fashion_mnist")(load_fashion_mnist)
