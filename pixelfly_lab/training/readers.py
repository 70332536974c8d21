"""Data sets that are read, not generated: from an installed package, a shipped file, or a local folder.

| name | x (one example) | y | task | source |
|---|---|---|---|---|
| digits | (1, 8, 8) float | class 0-9 | classification | scikit-learn's 8x8 digits (1797 images) |
| chars | (context,) tokens | next tokens | lm | ``data/shakespeare.txt`` (public domain) |
| cifar10 | (3, 32, 32) float | class 0-9 | classification | the user's ``cifar-10-batches-py`` folder |

Nothing is downloaded. CIFAR-10 (Krizhevsky 2009) is read with an unpickler that accepts only
arrays, so a data file cannot run code; the corpus' source and licence are in data/README.md.

Example:
    >>> load_digits(seed=0).input_shape
    (1, 8, 8)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from pixelfly_lab._checks import check_int
from pixelfly_lab.training.tasks import TaskData, as_tensors, standardise

__all__ = ["load_digits", "load_chars", "load_cifar10", "CHARS_PATH"]

CHARS_PATH = Path(__file__).resolve().parents[2] / "data" / "shakespeare.txt"


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> TaskData:
    """scikit-learn's handwritten digits: 1797 images of 8x8 pixels, 10 classes.

    Args:
        seed: seeds the train/test shuffle.
        test_fraction: share held out for test (0.2 -> 1438 train, 359 test).

    Returns:
        :class:`TaskData`, x (N, 1, 8, 8) standardised with one mean and std (all pixels share
        a unit), y int64 in 0..9.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # ships inside scikit-learn

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sklearn_digits()
    x = bunch.images.astype(np.float64)[:, None]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    train, test = order[n_test:], order[:n_test]
    x_tr, x_te = standardise(x[train], x[test], axes=(0, 1, 2, 3))
    return TaskData("digits", "classification", "image", *as_tensors(x_tr, y[train], x_te, y[test]),
                    n_outputs=10, info={"source": "sklearn.datasets.load_digits", "seed": seed})



def load_chars(context: int = 64, path: str | Path | None = None, val_fraction: float = 0.1) -> TaskData:
    """Character-level language modelling on a text file (default: the shipped Shakespeare corpus).

    The first ``1 - val_fraction`` of the text trains, the rest validates; both are cut into
    non-overlapping windows: x = ids[s : s + context], y = ids[s + 1 : s + context + 1].

    Args:
        context: characters per window (the model's sequence length).
        path: a UTF-8 text file; default ``data/shakespeare.txt``.
        val_fraction: share of the text (its end) held out.

    Returns:
        :class:`TaskData`, x and y (N, context) int64; info['vocab'] is the string of characters
        (token i is vocab[i]).
    """
    check_int("context", context, 2)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    path = Path(path) if path is not None else CHARS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"character corpus not found: {path} (the repository ships data/shakespeare.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"character corpus {path} is not UTF-8 text: {err}") from None
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes, ids = np.unique(codes, return_inverse=True)
    split = int(len(ids) * (1.0 - val_fraction))
    if min(split, len(ids) - split) < context + 1:
        raise ValueError(f"character corpus {path} has {len(ids)} characters: too short for context={context}")

    def windows(part: np.ndarray):
        count = (len(part) - 1) // context
        return (part[:count * context].reshape(count, context).astype(np.int64),
                part[1:count * context + 1].reshape(count, context).astype(np.int64))

    vocab = "".join(map(chr, vocab_codes))
    return TaskData("chars", "lm", "tokens", *as_tensors(*windows(ids[:split]), *windows(ids[split:])),
                    n_outputs=len(vocab), vocab_size=len(vocab), info={"vocab": vocab, "source": str(path)})


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, bytes and numpy arrays: a data file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path):
    """One CIFAR-10 python batch: (uint8 (n, 3, 32, 32), int64 (n,))."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise ValueError(f"{path} is not a readable CIFAR-10 batch (corrupt or wrong format): {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path} is not a CIFAR-10 batch: data {data.dtype} {data.shape}, {len(labels)} labels "
                         "(expected uint8 (n, 3072) and n labels)")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path | None = None) -> TaskData:
    """CIFAR-10 from a local folder in its standard python format (no download).

    Args:
        root: the ``cifar-10-batches-py`` folder (from cifar-10-python.tar.gz), or its parent;
            it must hold data_batch_1 .. data_batch_5 and test_batch.

    Returns:
        :class:`TaskData`, x (N, 3, 32, 32) float32 standardised per channel, y int64 in 0..9.

    Raises:
        FileNotFoundError: the folder or a batch file is missing.
        ValueError: a batch file is corrupt or not in CIFAR-10's format.
    """
    if root is None:
        raise ValueError("cifar10 needs root: the local folder that holds cifar-10-batches-py")
    root = Path(root)
    folder = root if (root / "test_batch").exists() else root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 not found under {root}: missing {', '.join(missing)} (looked in "
                                f"{folder}); extract cifar-10-python.tar.gz there")
    train = [_read_cifar_batch(folder / name) for name in names[:-1]]
    x_te, y_te = _read_cifar_batch(folder / "test_batch")
    x_tr = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    y_tr = np.concatenate([y for _, y in train])
    x_tr, x_te = standardise(x_tr, x_te.astype(np.float32) / 255.0, axes=(0, 2, 3))
    return TaskData("cifar10", "classification", "image", *as_tensors(x_tr, y_tr, x_te, y_te), n_outputs=10,
                    info={"source": str(folder)})
