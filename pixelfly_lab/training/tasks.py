"""What every data loader returns: :class:`TaskData`, and the helpers the loaders share.

A :class:`TaskData` holds a learning task's train and test tensors and what a model builder needs
to know about them (task, input kind, number of outputs, vocabulary size).

Example:
    >>> import torch
    >>> data = TaskData("toy", "regression", "features", torch.zeros(4, 3), torch.zeros(4, 1),
    ...                 torch.zeros(2, 3), torch.zeros(2, 1), n_outputs=1)
    >>> data.input_shape, len(data.subset(max_train=2).x_train)
    ((3,), 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pixelfly_lab._checks import check_int

__all__ = ["TaskData", "standardise", "as_tensors", "check_sizes"]


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


def standardise(x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]):
    """Centre and scale both splits by the training split's mean and std over ``axes``."""
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def as_tensors(*arrays):
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        check_int(name, value)
