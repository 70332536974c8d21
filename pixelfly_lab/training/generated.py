"""Generated data sets: MNIST-1D (from its reference generator), ListOps, teacher-student tasks.

Each is a deterministic function of its ``seed``; nothing is downloaded.

| name | x (one example) | y | task |
|---|---|---|---|
| mnist1d | (1, 40) float | class 0-9 | classification |
| listops | (max_len,) tokens | value 0-9 | classification |
| teacher | (d_in,) float | (d_out,) float | regression |
| teacher-pixelfly | (d_in,) float | class 0..n_classes-1 | classification (a Pixelfly-structured teacher) |
| teacher-dense | (d_in,) float | class 0..n_classes-1 | classification (an unstructured teacher) |

References: MNIST-1D (Greydanus 2020), arXiv 2011.14439; ListOps (Nangia & Bowman 2018) as in
Long Range Arena (Tay et al. 2020), arXiv 2011.04006.

Example:
    >>> make_teacher(n_train=8, n_test=4, d_in=5, d_out=2).x_train.shape
    torch.Size([8, 5])
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from pixelfly_lab._checks import check_budget, check_choice, check_int
from pixelfly_lab.structure.patterns import make_pattern
from pixelfly_lab.training.tasks import TaskData, as_tensors, check_sizes

__all__ = ["make_mnist1d", "make_listops", "make_teacher", "make_teacher_student", "make_teacher_pixelfly",
           "make_teacher_dense", "TEACHER_STRUCTURES", "LISTOPS_VOCAB"]

# Token 0 pads; digits are 1..10; then the four operators (opening bracket included) and ']'.
LISTOPS_VOCAB = ("<pad>",) + tuple("0123456789") + ("[MAX", "[MIN", "[MED", "[SM", "]")


def make_mnist1d(n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> TaskData:
    """MNIST-1D from its reference generator (Greydanus 2020, arXiv 2011.14439; PyPI ``mnist1d``).

    The ``mnist1d`` package's ``make_dataset`` with its default arguments (its ten hand-drawn
    12-point templates, random padding, scaling, translation, correlated and white noise, shear,
    resampled to 40 points, the whole set centred and scaled to unit variance), generated
    offline: nothing is downloaded. With the defaults here (4000 + 1000 examples, ``seed=0``) it
    is the published data set, so test accuracies compare with the paper's baselines (Table 1 of
    arXiv 2011.14439, test accuracy over seeds):

    | model | MNIST-1D test accuracy |
    |---|---|
    | logistic regression | 32 +- 1 % |
    | MLP | 68 +- 2 % |
    | CNN | 94 +- 2 % |
    | GRU | 91 +- 2 % |
    | human expert | 96 +- 1 % |

    This toolkit's dense MLP beside them (four hidden layers of 512, ``python -m pixelfly_lab train
    --model mlp --data mnist1d --size small --epochs 30 --seed S --data-option seed=0``, seeds 0, 1, 2,
    measured 2026-12-06): 76.1 %, 74.1 %, 77.7 % test accuracy (mean 76.0 %), above the paper's MLP
    (a smaller one) and far below its CNN, as the data set intends: a fully connected net does not
    share what it learns across positions.

    Args:
        n_train, n_test: examples per split. Other sizes generate 10 * ceil((n_train + n_test) / 10)
            examples (classes balanced over the whole draw) and split the first n_train from the
            next n_test.
        seed: 0 is the reference's own draw (its seed 42); seed s draws with seed 42 + s. The
            generator seeds numpy's and Python's global random state; both are restored after.

    Returns:
        :class:`TaskData`, x (N, 1, 40) float32, y int64 in 0..9.
    """
    # imported here, not at the top: mnist1d imports matplotlib.pyplot, which `import pixelfly_lab` must not
    from mnist1d.data import get_dataset_args, make_dataset

    check_sizes(n_train=n_train, n_test=n_test)
    check_int("seed", seed, 0)
    args = get_dataset_args()
    args.num_samples = 10 * -(-(n_train + n_test) // 10)
    args.seed = 42 + seed
    states = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    split = slice(0, n_train), slice(n_train, n_train + n_test)
    return TaskData("mnist1d", "classification", "signal", *as_tensors(x[split[0]], y[split[0]], x[split[1]], y[split[1]]),
                    n_outputs=10, info={"source": "mnist1d.data.make_dataset", "seed": args.seed,
                                        "num_samples": args.num_samples})


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
    check_sizes(n_train=n_train, n_test=n_test, max_len=max_len, max_depth=max_depth)
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
    return TaskData("listops", "classification", "tokens", *as_tensors(x[:n_train], y[:n_train], x[n_train:],
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
    check_sizes(n_train=n_train, n_test=n_test, d_in=d_in, d_out=d_out, width=width)
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((width, d_in)) / np.sqrt(d_in)
    w2 = rng.standard_normal((d_out, width)) / np.sqrt(width)
    x = rng.standard_normal((n_train + n_test, d_in))
    y = np.tanh(x @ w1.T) @ w2.T + noise * rng.standard_normal((n_train + n_test, d_out))
    x, y = x.astype(np.float32), y.astype(np.float32)
    return TaskData("teacher", "regression", "features", *as_tensors(x[:n_train], y[:n_train], x[n_train:],
                    y[n_train:]), n_outputs=d_out, info={"noise": noise, "width": width, "seed": seed,
                                                         "w1": torch.from_numpy(w1), "w2": torch.from_numpy(w2)})


TEACHER_STRUCTURES = ("pixelfly", "dense")


def _teacher_hidden(structure: str, width: int, budget: float, block_size: int, rng: np.random.Generator) -> dict:
    """One (width, width) hidden weight of the teacher and its parts (float64 tensors).

    'pixelfly': S + U V^T, S Gaussian on the flat block butterfly layout that
    :func:`pixelfly_lab.structure.patterns.make_pattern` plans for ('pixelfly', width, width, budget,
    block_size), U V^T of that plan's rank; each part carries half the variance of a unit-variance
    input's image (a row of S holds its row's nnz entries of variance 1 / (2 nnz); U ~ N(0, 1/r),
    V ~ N(0, 1 / (2 width))). 'dense': every entry N(0, 1/width).
    """
    if structure == "dense":
        return {"weight": torch.from_numpy(rng.standard_normal((width, width)) / np.sqrt(width))}
    pattern = make_pattern("pixelfly", width, width, budget, block_size=block_size)
    mask = pattern.mask().numpy()
    per_row = mask.sum(1, keepdims=True)
    sparse = np.where(mask, rng.standard_normal((width, width)) / np.sqrt(2 * np.maximum(per_row, 1)), 0.0)
    rank = pattern.rank
    u = rng.standard_normal((width, rank)) / np.sqrt(max(rank, 1))
    v = rng.standard_normal((width, rank)) / np.sqrt(2 * width)
    sparse, u, v = (torch.from_numpy(a) for a in (sparse, u, v))
    return {"weight": sparse + u @ v.T, "sparse": sparse, "u": u, "v": v, "layout": pattern.layout.clone(),
            "rank": rank, "block_size": block_size, "budget": pattern.budget}


def make_teacher_student(structure: str = "pixelfly", n_train: int = 8000, n_test: int = 2000, width: int = 128,
                         n_hidden: int = 1, n_outputs: int = 64, task: str = "regression", budget: float = 0.25,
                         block_size: int = 8, seed: int = 0) -> TaskData:
    """Teacher-student task: a random MLP teacher, structured or not, labels Gaussian inputs.

        x ~ N(0, I_width),   h_0 = x,   h_k = gelu(W_k h_{k-1}) (k = 1..n_hidden),   z = B h_n + b
        regression: y = z / s;   classification: y = argmax_c z_c

    B (n_outputs, width) ~ N(0, 1/width) is dense in both variants; b centres every output over
    the training inputs (classes roughly balanced) and s scales the regression targets to unit
    variance over them. The labels carry no noise: a student that contains the teacher can reach
    test MSE 0 (100%). The hidden weights W_k (width, width) are what the two variants are for:

    * ``'pixelfly'`` (data set ``teacher-pixelfly``): W_k = S_k + U_k V_k^T, S_k Gaussian on the flat
      block butterfly layout and U_k V_k^T of the rank that the Pixelfly pattern at ``budget`` and
      ``block_size`` plans for a (width, width) weight (Dao, Chen et al., arXiv 2112.00029, Sec. 3:
      the structure Pixelfly assumes); each part carries half of the variance. An MLP of hidden
      width ``width`` and depth ``n_hidden`` whose every layer, the input layer included, is
      Pixelfly at that budget and block contains the teacher exactly; low-rank alone cannot hold
      the sparse part's full rank, a random block layout misses its support. The task on which
      patterns must separate.
    * ``'dense'`` (data set ``teacher-dense``): W_k ~ N(0, 1/width), no structure; no pattern at
      the same budget contains it and none is favoured by its support: the control task.

    The first structured layer reads x itself: behind a dense input layer the teacher's hidden
    units can be permuted and rescaled at will, and a student trained from scratch did not find
    the alignment (measured at width 256: Pixelfly 0.337 against random 0.340 test MSE).

    Args:
        structure: 'pixelfly' or 'dense' (:data:`TEACHER_STRUCTURES`).
        n_train, n_test: examples per split.
        width: input size and hidden width (divisible by ``block_size``).
        n_hidden: structured (or dense) hidden layers (>= 1).
        n_outputs: regression outputs or classes (>= 2 for classification).
        task: 'regression' (default: outputs carry far more information per example than a
            class, so the students' differences show at small sizes) or 'classification'.
        budget, block_size: the Pixelfly pattern of the structured teacher (ignored by 'dense').
        seed: seeds the teacher and then the inputs (numpy's PCG64, one stream per structure).

    Returns:
        :class:`TaskData` 'teacher-<structure>': x (N, width) float32; y (N, n_outputs) float32
        (regression) or (N,) int64 (classification). info['hidden']: n_hidden dicts with 'weight'
        W_k (float64), and for 'pixelfly' 'sparse', 'u', 'v', 'layout', 'rank', 'block_size',
        'budget'; info['head'] B, info['bias'] b, info['scale'] s (1 for classification),
        info['class_shares'] (classification: training label frequencies).

    Example:
        >>> data = make_teacher_student("pixelfly", n_train=8, n_test=4, width=64, n_outputs=3)
        >>> data.x_train.shape, data.y_train.shape, data.info["hidden"][0]["rank"] > 0
        (torch.Size([8, 64]), torch.Size([8, 3]), True)
    """
    check_choice("structure", structure, TEACHER_STRUCTURES)
    check_choice("task", task, ("regression", "classification"))
    check_sizes(n_train=n_train, n_test=n_test, width=width, n_hidden=n_hidden, block_size=block_size)
    check_int("n_outputs", n_outputs, 2 if task == "classification" else 1)
    check_budget(budget)
    check_int("seed", seed, 0)
    if width % block_size:
        raise ValueError(f"block_size={block_size} must divide width={width}")
    rng = np.random.default_rng([seed, TEACHER_STRUCTURES.index(structure)])
    hidden = [_teacher_hidden(structure, width, budget, block_size, rng) for _ in range(n_hidden)]
    head = torch.from_numpy(rng.standard_normal((n_outputs, width)) / np.sqrt(width))
    x = torch.from_numpy(rng.standard_normal((n_train + n_test, width)))
    h = x
    for layer in hidden:
        h = F.gelu(h @ layer["weight"].T)
    z = h @ head.T
    bias = -z[:n_train].mean(0)
    z = z + bias
    info = {"structure": structure, "seed": seed, "width": width, "n_hidden": n_hidden, "hidden": hidden,
            "head": head, "bias": bias, "scale": 1.0}
    if task == "regression":
        info["scale"] = float(z[:n_train].std())
        y = (z / info["scale"]).float()
    else:
        y = z.argmax(1)
        info["class_shares"] = torch.bincount(y[:n_train], minlength=n_outputs).double() / n_train
    x = x.float()
    return TaskData(f"teacher-{structure}", task, "features", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                    n_outputs=n_outputs, info=info)


def make_teacher_pixelfly(**options) -> TaskData:
    """:func:`make_teacher_student` with ``structure='pixelfly'`` (data set ``teacher-pixelfly``)."""
    return make_teacher_student("pixelfly", **options)


def make_teacher_dense(**options) -> TaskData:
    """:func:`make_teacher_student` with ``structure='dense'`` (data set ``teacher-dense``)."""
    return make_teacher_student("dense", **options)
