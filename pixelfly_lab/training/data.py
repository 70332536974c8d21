"""Offline data sets for the training lab: from installed packages, generated, shipped, or local.

Nothing is downloaded. Every loader returns a :class:`TaskData`: train and test tensors plus what
a model builder needs to know (task, input kind, number of outputs, vocabulary size).

| name | x (one example) | y | task | source |
|---|---|---|---|---|
| digits | (1, 8, 8) float | class 0-9 | classification | scikit-learn's 8x8 digits (1797 images) |
| mnist1d | (1, 40) float | class 0-9 | classification | generated, MNIST-1D style (Greydanus 2020) |
| listops | (max_len,) tokens | value 0-9 | classification | generated ListOps (Nangia & Bowman 2018; LRA) |
| teacher | (d_in,) float | (d_out,) float | regression | generated: random two-layer tanh net + noise |
| chars | (context,) tokens | next tokens | lm | ``data/shakespeare.txt`` (public domain) |
| cifar10 | (3, 32, 32) float | class 0-9 | classification | the user's ``cifar-10-batches-py`` folder |

References: MNIST-1D, arXiv 2011.14439; Long Range Arena (Tay et al. 2020), arXiv 2011.04006;
CIFAR-10 (Krizhevsky 2009); the corpus' source and licence are in data/README.md.

Generated sets are deterministic functions of ``seed``; float inputs are standardised with the
training split's statistics.

Example:
    >>> data = load_data("digits", seed=0)
    >>> data.input_shape, data.n_outputs
    ((1, 8, 8), 10)
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pixelfly_lab._checks import check_int

__all__ = ["DATASETS", "TaskData", "load_data", "load_digits", "make_mnist1d", "make_listops",
           "make_teacher", "load_chars", "load_cifar10", "CHARS_PATH", "LISTOPS_VOCAB"]

DATASETS = ("digits", "mnist1d", "listops", "teacher", "chars", "cifar10")
CHARS_PATH = Path(__file__).resolve().parents[2] / "data" / "shakespeare.txt"
# Token 0 pads; digits are 1..10; then the four operators (opening bracket included) and ']'.
LISTOPS_VOCAB = ("<pad>",) + tuple("0123456789") + ("[MAX", "[MIN", "[MED", "[SM", "]")


@dataclass(frozen=True, eq=False)
class TaskData:
    """A learning task's tensors and what a model needs to know about them.

    Attributes:
        name: data set name (one of :data:`DATASETS`).
        task: 'classification' (y int64 (N,)), 'regression' (y float32 (N, n_outputs)) or
            'lm' (y int64 (N, T): the next token at every position).
        kind: input kind: 'features' (N, D), 'signal' (N, C, L), 'image' (N, C, H, W) or
            'tokens' (N, T) int64.
        x_train, y_train, x_test, y_test: the tensors (float32 inputs, int64 tokens and labels).
        n_outputs: classes, regression outputs, or the vocabulary size for 'lm'.
        vocab_size: token vocabulary size for kind 'tokens', else None.
        info: anything else (vocabulary, generator settings, source).
    """

    name: str
    task: str
    kind: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_outputs: int
    vocab_size: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's input."""
        return tuple(self.x_train.shape[1:])

    def subset(self, max_train: int | None = None, max_test: int | None = None) -> TaskData:
        """The same task keeping only the first ``max_train`` / ``max_test`` examples."""
        return TaskData(self.name, self.task, self.kind, self.x_train[:max_train], self.y_train[:max_train],
                        self.x_test[:max_test], self.y_test[:max_test], self.n_outputs, self.vocab_size,
                        dict(self.info))

    def __repr__(self) -> str:
        return (f"TaskData({self.name!r}, task={self.task!r}, kind={self.kind!r}, train={len(self.x_train)}, "
                f"test={len(self.x_test)}, input_shape={self.input_shape}, n_outputs={self.n_outputs})")


def _standardise(x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]):
    """Centre and scale both splits by the training split's mean and std over ``axes``."""
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _tensors(*arrays):
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        check_int(name, value)


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
    x_tr, x_te = _standardise(x[train], x[test], axes=(0, 1, 2, 3))
    return TaskData("digits", "classification", "image", *_tensors(x_tr, y[train], x_te, y[test]),
                    n_outputs=10, info={"source": "sklearn.datasets.load_digits", "seed": seed})


def _mnist1d_templates() -> np.ndarray:
    """Ten 12-point shapes, one per class: (10, 12), values in [-1, 1]."""
    t = np.linspace(0.0, 1.0, 12)
    return np.stack([
        np.sin(np.pi * t),                      # 0 bump
        np.maximum(0.0, 1.0 - 6.0 * np.abs(t - 0.5)),  # 1 narrow spike
        2.0 * t - 1.0,                          # 2 ramp up
        1.0 - 2.0 * t,                          # 3 ramp down
        np.abs(np.sin(2.0 * np.pi * t)),        # 4 two bumps
        -np.sin(np.pi * t),                     # 5 dip
        np.where(t > 0.5, 1.0, -1.0),           # 6 step
        np.sin(2.0 * np.pi * t),                # 7 one wave
        np.where(np.abs(t - 0.5) < 0.25, 1.0, 0.0),  # 8 square pulse
        2.0 * ((2.0 * t) % 1.0) - 1.0,          # 9 sawtooth
    ])


def make_mnist1d(n_train: int = 4000, n_test: int = 1000, length: int = 40, seed: int = 0) -> TaskData:
    """A procedural 1-D digit task in the style of MNIST-1D (Greydanus 2020).

    Each example draws one of ten 12-point templates (its class), stretches it to a random width
    w ~ U(0.3, 0.5) * length, scales it by a ~ U(0.7, 1.3), places it at a random offset, then
    adds a random linear shear, smooth correlated noise and white noise:

        x[t] = a * template((t - offset) / w) + slope * (t / length - 1/2) + 0.3 * smooth_t + 0.1 * eps_t

    The templates and augmentations are ours (the original's are hand-drawn); what matters is
    the same character: easy for nonlinear models, hard for linear ones, tunable at no cost.

    Args:
        n_train, n_test: examples per split (classes balanced).
        length: points per signal.
        seed: seeds everything.

    Returns:
        :class:`TaskData`, x (N, 1, length) float32, y int64 in 0..9.
    """
    _check_sizes(n_train=n_train, n_test=n_test, length=length)
    if length < 16:
        raise ValueError(f"length must be >= 16, got {length}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.permutation(np.arange(n) % 10)
    templates = _mnist1d_templates()
    width = rng.uniform(0.3, 0.5, n) * length
    offset = rng.uniform(0.0, 1.0, n) * (length - width)
    amplitude = rng.uniform(0.7, 1.3, n)
    slope = rng.uniform(-1.0, 1.0, n)
    t = np.arange(length, dtype=np.float64)
    u = (t[None, :] - offset[:, None]) / width[:, None]          # (N, length): 0..1 inside the shape
    grid = np.linspace(0.0, 1.0, templates.shape[1])
    shape = np.stack([np.interp(u[i], grid, templates[y[i]], left=0.0, right=0.0) for i in range(n)])
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    kernel /= np.sqrt((kernel ** 2).sum())                      # unit-variance smooth noise
    white = rng.standard_normal((n, length + 12))
    smooth = np.stack([np.convolve(row, kernel, mode="valid") for row in white])
    x = (amplitude[:, None] * shape + slope[:, None] * (t / length - 0.5)
         + 0.3 * smooth + 0.1 * rng.standard_normal((n, length)))
    x_tr, x_te = _standardise(x[:n_train, None], x[n_train:, None], axes=(0, 1, 2))
    return TaskData("mnist1d", "classification", "signal", *_tensors(x_tr, y[:n_train], x_te, y[n_train:]),
                    n_outputs=10, info={"length": length, "seed": seed})


_LISTOPS_OPS = {
    "[MAX": max,
    "[MIN": min,
    "[MED": lambda args: (sorted(args)[(len(args) - 1) // 2] + sorted(args)[len(args) // 2]) // 2,  # floor
    "[SM": lambda args: sum(args) % 10,
}


class _TooLong(Exception):
    """An expression outgrew max_len while being drawn: it would be redrawn anyway."""


def _take(room: list, n: int) -> None:
    room[0] -= n
    if room[0] < 0:
        raise _TooLong


def _listops_expression(rng: random.Random, depth: int, max_depth: int, max_args: int, room: list,
                        leaf_prob: float):
    """One random expression: (list of token strings, integer value 0..9).

    ``room`` is a one-element list, the tokens still allowed: drawing stops with _TooLong once it
    is used up. Accepted expressions are distributed as when drawn whole and rejected if too
    long, but a rejection costs at most max_len tokens (at LRA's depth 10 and 10 arguments a
    whole draw can run to millions of tokens).
    """
    # The root is always an operator; below it an argument is a digit with probability leaf_prob
    # (0.6 by default), which keeps the expected length finite while still nesting to max_depth.
    if depth > 0 and (depth >= max_depth or rng.random() < leaf_prob):
        _take(room, 1)
        digit = rng.randrange(10)
        return [str(digit)], digit
    _take(room, 2)  # the operator and its closing bracket
    op = rng.choice(tuple(_LISTOPS_OPS))
    tokens, values = [op], []
    for _ in range(rng.randint(2, max_args)):
        sub_tokens, value = _listops_expression(rng, depth + 1, max_depth, max_args, room, leaf_prob)
        tokens += sub_tokens
        values.append(value)
    return tokens + ["]"], _LISTOPS_OPS[op](values)


def make_listops(n_train: int = 4000, n_test: int = 1000, max_len: int = 128, max_depth: int = 4,
                 max_args: int = 5, seed: int = 0, min_len: int = 0, leaf_prob: float = 0.6) -> TaskData:
    """Generated ListOps: nested MAX / MIN / MED / SM (sum mod 10) over digits; predict the value.

    Example expression: ``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9. Tokens follow :data:`LISTOPS_VOCAB`
    (0 pads the end of the sequence). Expressions longer than ``max_len`` (or shorter than
    ``min_len``) are redrawn. Long Range Arena's setting (Tay et al. 2021, arXiv 2011.04006):
    ``max_len=2048, max_depth=10, max_args=10``; with ``leaf_prob=0.8`` (an operator then has
    (1 - 0.8) * 6 = 1.2 operator arguments on average, near the critical branching of 1) and
    ``min_len=500`` most sequences are 500-2048 tokens long. A draw stops as soon as it is too
    long, so rejections stay cheap.

    Args:
        n_train, n_test: examples per split.
        max_len: sequence length (padded).
        max_depth: deepest operator nesting (the root is depth 0).
        max_args: most arguments per operator (at least 2).
        seed: seeds everything.
        min_len: shortest expression kept (0: all); long ones make attention over the whole
            sequence matter.
        leaf_prob: probability that an argument below the root is a digit; smaller values nest
            more and lengthen expressions.

    Returns:
        :class:`TaskData`, x (N, max_len) int64 tokens, y int64 in 0..9; info['majority_accuracy']
        is the test accuracy of always answering the most frequent training label.
    """
    _check_sizes(n_train=n_train, n_test=n_test, max_len=max_len, max_depth=max_depth)
    check_int("max_args", max_args, 2)
    if max_len < 4:
        raise ValueError(f"max_len must be >= 4, got {max_len}")
    if isinstance(leaf_prob, bool) or not isinstance(leaf_prob, (int, float)) or not 0 < leaf_prob <= 1:
        raise ValueError(f"leaf_prob must be a number in (0, 1], got {leaf_prob!r}")
    if isinstance(min_len, bool) or not isinstance(min_len, int) or not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be an int in [0, max_len={max_len}], got {min_len!r}")
    rng = random.Random(seed)  # scalar draws: the standard library's generator is ~10x faster here
    index = {token: i for i, token in enumerate(LISTOPS_VOCAB)}
    n = n_train + n_test
    x = np.zeros((n, max_len), dtype=np.int64)
    y = np.zeros(n, dtype=np.int64)
    made, tries = 0, 0
    while made < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"no expression of {min_len} to {max_len} tokens in {tries - 1} draws at "
                             f"max_depth={max_depth}, max_args={max_args}")
        try:
            tokens, value = _listops_expression(rng, 0, max_depth, max_args, [max_len], leaf_prob)
        except _TooLong:
            continue
        if len(tokens) >= min_len:
            x[made, :len(tokens)] = [index[token] for token in tokens]
            y[made] = value
            made += 1
    majority = np.bincount(y[:n_train], minlength=10).argmax()
    info = {"vocab": LISTOPS_VOCAB, "max_depth": max_depth, "max_args": max_args, "seed": seed, "min_len": min_len,
            "leaf_prob": leaf_prob,
            "majority_accuracy": float((y[n_train:] == majority).mean())}
    return TaskData("listops", "classification", "tokens", *_tensors(x[:n_train], y[:n_train], x[n_train:],
                    y[n_train:]), n_outputs=10, vocab_size=len(LISTOPS_VOCAB), info=info)


def make_teacher(n_train: int = 2048, n_test: int = 512, d_in: int = 64, d_out: int = 8, width: int = 128,
                 noise: float = 0.1, seed: int = 0) -> TaskData:
    """Teacher-student regression: a random two-layer tanh teacher labels Gaussian inputs.

        x ~ N(0, I_{d_in}),   y = W2 tanh(W1 x) + noise * eps,
        W1 ~ N(0, 1/d_in) (width, d_in),   W2 ~ N(0, 1/width) (d_out, width)

    Args:
        n_train, n_test: examples per split.
        d_in, d_out, width: teacher sizes.
        noise: label noise standard deviation (the best test MSE is noise**2).
        seed: seeds the teacher and the data.

    Returns:
        :class:`TaskData`, x (N, d_in) float32, y (N, d_out) float32; info['w1'], info['w2'] are the
        teacher's float64 weights.
    """
    _check_sizes(n_train=n_train, n_test=n_test, d_in=d_in, d_out=d_out, width=width)
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((width, d_in)) / np.sqrt(d_in)
    w2 = rng.standard_normal((d_out, width)) / np.sqrt(width)
    x = rng.standard_normal((n_train + n_test, d_in))
    y = np.tanh(x @ w1.T) @ w2.T + noise * rng.standard_normal((n_train + n_test, d_out))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return TaskData("teacher", "regression", "features", *_tensors(x[:n_train], y[:n_train], x[n_train:],
                    y[n_train:]), n_outputs=d_out, info={"noise": noise, "width": width, "seed": seed,
                                                         "w1": torch.from_numpy(w1), "w2": torch.from_numpy(w2)})


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
    return TaskData("chars", "lm", "tokens", *_tensors(*windows(ids[:split]), *windows(ids[split:])),
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
    x_tr, x_te = _standardise(x_tr, x_te.astype(np.float32) / 255.0, axes=(0, 2, 3))
    return TaskData("cifar10", "classification", "image", *_tensors(x_tr, y_tr, x_te, y_te), n_outputs=10,
                    info={"source": str(folder)})


def load_data(name: str, *, seed: int = 0, max_train: int | None = None, max_test: int | None = None,
              **options) -> TaskData:
    """Load or generate a data set by name.

    Args:
        name: one of :data:`DATASETS`.
        seed: seeds generated sets and the digits split (chars and cifar10 have fixed splits).
        max_train, max_test: keep only the first examples of each split (quick runs).
        **options: passed to the loader (e.g. ``context`` for chars, ``root`` for cifar10,
            ``n_train`` / ``max_len`` for listops).

    Returns:
        :class:`TaskData`.

    Example:
        >>> load_data("listops", n_train=100, n_test=20, max_len=64).x_train.shape
        torch.Size([100, 64])
    """
    loaders = {"digits": load_digits, "mnist1d": make_mnist1d, "listops": make_listops,
               "teacher": make_teacher, "chars": load_chars, "cifar10": load_cifar10}
    if not isinstance(name, str) or name not in loaders:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    check_int("seed", seed, 0)
    if name not in ("chars", "cifar10"):
        options["seed"] = seed
    for limit_name, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None:
            check_int(limit_name, limit)
    try:
        data = loaders[name](**options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise TypeError(f"data set {name!r} got an unknown option: {err}") from None
        raise
    return data.subset(max_train, max_test) if max_train or max_test else data
