"""Data sets: shapes, labels against independent oracles, determinism, and clear errors."""

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from pixelfly_lab.training.data import (CHARS_PATH, DATASETS, LISTOPS_VOCAB, load_chars, load_cifar10, load_data,
                               make_listops, make_mnist1d, make_teacher, make_teacher_student)


def _evaluate_listops(tokens):
    """Independent ListOps oracle: parse the token ids with an explicit stack."""
    words = [LISTOPS_VOCAB[t] for t in tokens if t != 0]
    stack = [[]]
    for word in words:
        if word.startswith("["):
            stack.append([word])
        elif word == "]":
            op, *args = stack.pop()
            ordered = sorted(args)
            value = {"[MAX": max(args), "[MIN": min(args), "[SM": sum(args) % 10,
                     "[MED": int(np.floor(np.median(ordered)))}[op]
            stack[-1].append(value)
        else:
            stack[-1].append(int(word))
    assert len(stack) == 1 and len(stack[0]) == 1, "unbalanced expression"
    return stack[0][0]


def test_digits_shapes_split_and_scaling():
    data = load_data("digits", seed=0)
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_test.shape == (359, 1, 8, 8)
    assert data.task == "classification" and data.kind == "image" and data.n_outputs == 10
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert set(data.y_train.tolist()) == set(range(10))
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    # the split is a permutation: every image appears once over train + test
    both = torch.cat([data.x_train, data.x_test]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(torch.from_numpy(load_digits().data), dim=0).shape[0]
    assert torch.equal(load_data("digits", seed=0).y_test, data.y_test)
    assert not torch.equal(load_data("digits", seed=1).y_test, data.y_test)


def test_mnist1d_shapes_balance_determinism():
    data = make_mnist1d(n_train=200, n_test=50, seed=3)
    assert data.x_train.shape == (200, 1, 40) and data.kind == "signal"
    assert torch.bincount(torch.cat([data.y_train, data.y_test])).tolist() == [25] * 10
    again = make_mnist1d(n_train=200, n_test=50, seed=3)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    assert not torch.equal(make_mnist1d(n_train=200, n_test=50, seed=4).x_train, data.x_train)
    # the class is in the signal: class means differ far more than noise would make them
    means = torch.stack([data.x_train[data.y_train == c].mean(0).flatten() for c in range(10)])
    assert torch.cdist(means, means).max() > 2.0


def test_mnist1d_default_is_the_reference_data_set_generated_offline(monkeypatch):
    """seed 0 at 4000 + 1000 is mnist1d's make_dataset with its default arguments, bit for bit, made
    with every network connection refused; the global random states are left as they were."""
    import random
    import socket

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    random.seed(5)
    np.random.seed(5)
    before = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    data = make_mnist1d()
    assert (random.random(), np.random.rand()) == before
    reference = make_dataset(get_dataset_args())
    assert np.array_equal(data.x_train[:, 0].numpy(), reference["x"].astype(np.float32))
    assert np.array_equal(data.x_test[:, 0].numpy(), reference["x_test"].astype(np.float32))
    assert np.array_equal(data.y_train.numpy(), reference["y"]) and np.array_equal(data.y_test.numpy(), reference["y_test"])
    assert data.info["seed"] == 42 and len(data.x_train) == 4000 and len(data.x_test) == 1000


def test_listops_labels_match_an_independent_evaluator():
    data = make_listops(n_train=150, n_test=50, max_len=48, max_depth=3, seed=1)
    assert data.x_train.shape == (150, 48) and data.vocab_size == len(LISTOPS_VOCAB) == 16
    for x, y in zip(torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])):
        assert _evaluate_listops(x.tolist()) == int(y)
    assert 0.0 < data.info["majority_accuracy"] < 1.0


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), max_len=st.integers(8, 40), max_depth=st.integers(1, 4),
       max_args=st.integers(2, 4))
def test_listops_structure(seed, max_len, max_depth, max_args):
    data = make_listops(n_train=12, n_test=4, max_len=max_len, max_depth=max_depth, max_args=max_args, seed=seed)
    x = torch.cat([data.x_train, data.x_test])
    lengths = (x > 0).sum(1)
    # padding only at the end, expressions start with an operator and end with ']'
    assert torch.all((x > 0).int().diff(dim=1) <= 0)
    assert torch.all(x[:, 0] >= LISTOPS_VOCAB.index("[MAX"))
    assert torch.all(x[torch.arange(len(x)), lengths - 1] == LISTOPS_VOCAB.index("]"))
    again = make_listops(n_train=12, n_test=4, max_len=max_len, max_depth=max_depth, max_args=max_args, seed=seed)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)


def test_teacher_labels_are_teacher_plus_noise():
    data = make_teacher(n_train=4000, n_test=100, d_in=16, d_out=4, width=32, noise=0.2, seed=0)
    x, y = data.x_train.double(), data.y_train.double()
    clean = torch.tanh(x @ data.info["w1"].T) @ data.info["w2"].T
    assert abs(float((y - clean).std()) - 0.2) < 0.01
    assert data.task == "regression" and data.y_train.shape == (4000, 4)


def _flat_butterfly_block_mask(width, butterfly_size, n_factors, block_size):
    """Oracle of the structured teacher's support, from the definition (DESIGN: flat block butterfly, no shuffle).

    Cell (i, j) of the butterfly_size grid is kept when i XOR j is 0 or 2^k (k < n_factors); each
    cell covers a (width / butterfly_size) square; a block_size block is kept when it touches a kept cell.
    """
    cell = torch.arange(width) * butterfly_size // width
    xor = cell[:, None] ^ cell[None, :]
    element = (xor == 0) | torch.stack([xor == 2 ** k for k in range(n_factors)]).any(0)
    blocks = element.reshape(width // block_size, block_size, width // block_size, block_size).any(3).any(1)
    return blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


@pytest.mark.parametrize("width, budget, block_size", [(128, 0.25, 8), (64, 0.5, 4), (256, 0.1, 16)])
def test_pixelfly_teacher_has_the_stated_support_and_rank(width, budget, block_size):
    data = make_teacher_student("pixelfly", n_train=16, n_test=8, width=width, n_hidden=2, budget=budget,
                                block_size=block_size, seed=1)
    for layer in data.info["hidden"]:
        plan_mask = _flat_butterfly_block_mask(width, *_plan(width, budget, block_size)[:2], block_size)
        sparse, u, v = layer["sparse"], layer["u"], layer["v"]
        assert torch.equal(sparse != 0, plan_mask)                      # Gaussian entries: nonzero a.s.
        assert torch.equal(layer["layout"].repeat_interleave(block_size, 0).repeat_interleave(block_size, 1),
                           plan_mask)
        assert u.shape == v.shape == (width, layer["rank"]) and layer["rank"] == _plan(width, budget, block_size)[2]
        assert int(torch.linalg.matrix_rank(layer["weight"] - sparse)) == layer["rank"]
        torch.testing.assert_close(layer["weight"], sparse + u @ v.T, rtol=0, atol=0)
        # the parameters the structure uses fit the budget it was planned for
        assert int(plan_mask.sum()) + layer["rank"] * 2 * width <= budget * width * width
        assert layer["budget"] <= budget


def _plan(width, budget, block_size):
    from pixelfly_lab.structure.patterns import plan_pixelfly

    plan = plan_pixelfly(width, width, budget, block_size)
    return plan.butterfly_size, plan.n_factors, plan.rank


def test_dense_teacher_has_no_structure():
    data = make_teacher_student("dense", n_train=16, n_test=8, width=64, seed=0)
    weight = data.info["hidden"][0]["weight"]
    assert set(data.info["hidden"][0]) == {"weight"} and bool((weight != 0).all())
    assert int(torch.linalg.matrix_rank(weight)) == 64
    assert abs(float(weight.std()) * 8 - 1) < 0.1                      # N(0, 1/width)


@pytest.mark.parametrize("structure", ["pixelfly", "dense"])
def test_teacher_student_labels_shapes_and_determinism(structure):
    data = make_teacher_student(structure, n_train=400, n_test=100, width=64, n_hidden=2, n_outputs=5, seed=3)
    assert data.name == f"teacher-{structure}" and data.task == "regression" and data.kind == "features"
    assert data.x_train.shape == (400, 64) and data.y_train.shape == (400, 5) and data.y_test.shape == (100, 5)
    assert data.x_train.dtype == data.y_train.dtype == torch.float32
    # the labels are the teacher's function of the inputs (recomputed here from its stored weights)
    h = torch.cat([data.x_train, data.x_test]).double()
    for layer in data.info["hidden"]:
        h = torch.nn.functional.gelu(h @ layer["weight"].T)
    y = (h @ data.info["head"].T + data.info["bias"]) / data.info["scale"]
    torch.testing.assert_close(y.float(), torch.cat([data.y_train, data.y_test]), rtol=1e-4, atol=1e-4)
    assert abs(float(data.y_train.std()) - 1) < 1e-3 and float(data.y_train.mean(0).abs().max()) < 1e-5
    again = make_teacher_student(structure, n_train=400, n_test=100, width=64, n_hidden=2, n_outputs=5, seed=3)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    other = make_teacher_student(structure, n_train=400, n_test=100, width=64, n_hidden=2, n_outputs=5, seed=4)
    assert not torch.equal(other.info["hidden"][0]["weight"], data.info["hidden"][0]["weight"])
    # the teacher depends on the seed only, not on how many examples are drawn
    more = make_teacher_student(structure, n_train=800, n_test=100, width=64, n_hidden=2, n_outputs=5, seed=3)
    assert torch.equal(more.info["hidden"][1]["weight"], data.info["hidden"][1]["weight"])
    assert torch.equal(more.x_train[:400], data.x_train)
    # the two variants are different teachers on different inputs
    twin = make_teacher_student("dense" if structure == "pixelfly" else "pixelfly", n_train=400, n_test=100,
                                width=64, n_hidden=2, n_outputs=5, seed=3)
    assert not torch.equal(twin.x_train, data.x_train)


def test_teacher_student_classification_is_the_argmax():
    data = make_teacher_student("pixelfly", n_train=2000, n_test=10, width=64, n_outputs=10, task="classification")
    assert data.task == "classification" and data.y_train.dtype == torch.int64 and data.n_outputs == 10
    h = torch.nn.functional.gelu(data.x_train.double() @ data.info["hidden"][0]["weight"].T)
    assert torch.equal((h @ data.info["head"].T + data.info["bias"]).argmax(1), data.y_train)
    shares = data.info["class_shares"]
    assert float(shares.sum()) == pytest.approx(1.0) and float(shares.min()) > 0.02   # every class present


def test_pixelfly_student_contains_the_pixelfly_teacher_exactly():
    """An MLP whose layers are Pixelfly at the teacher's budget and block reproduces its labels."""
    from pixelfly_lab.training.models import build_model

    data = make_teacher_student("pixelfly", n_train=64, n_test=8, width=128, n_outputs=6, seed=2)
    teacher = data.info["hidden"][0]
    model = build_model("mlp", data, size="tiny", pattern="pixelfly", budget=0.25, block_size=8, dim=32, depth=1,
                        where=("layers.*",))
    layer = model.layers[0]
    assert list(model.report.loc[model.report.replaced, "name"]) == ["layers.0"]   # where= reaches the input layer
    with pytest.raises(TypeError, match="where"):
        build_model("mlp", data, size="tiny", pattern="pixelfly", budget=0.25, block_size=8, where="layers.*")
    with torch.no_grad():
        assert layer.sparse.project_(teacher["sparse"].float()) == pytest.approx(0.0, abs=1e-6)
        layer.lowrank.u.copy_(teacher["u"]), layer.lowrank.v.copy_(teacher["v"]), layer.bias.zero_()
        model.head.weight.copy_(data.info["head"] / data.info["scale"])
        model.head.bias.copy_(data.info["bias"] / data.info["scale"])
        torch.testing.assert_close(model(data.x_train), data.y_train, rtol=1e-4, atol=1e-4)


def test_teacher_student_is_registered_and_checks_its_arguments():
    from pixelfly_lab.training.loop import TrainConfig

    assert {"teacher-pixelfly", "teacher-dense"} <= set(DATASETS)
    data = load_data("teacher-dense", seed=1, n_train=32, n_test=8, width=32, block_size=8)
    assert data.name == "teacher-dense" and data.info["seed"] == 1
    assert TrainConfig(data="teacher-pixelfly").data == "teacher-pixelfly"
    for bad, match in ((dict(structure="butterfly"), "structure"), (dict(task="lm"), "task"),
                       (dict(width=60), "block_size=8 must divide width=60"), (dict(budget=1.5), "budget"),
                       (dict(n_outputs=1, task="classification"), "n_outputs")):
        with pytest.raises(ValueError, match=match):
            make_teacher_student(**{"n_train": 8, "n_test": 4, **bad})
    with pytest.raises(TypeError, match="n_hidden"):
        make_teacher_student(n_hidden=1.0)


def test_chars_windows_and_vocabulary():
    data = load_chars(context=32)
    text = CHARS_PATH.read_text()
    vocab = data.info["vocab"]
    assert data.vocab_size == len(vocab) == len(set(text)) == 76
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    assert "".join(vocab[i] for i in data.x_train[0].tolist() + data.x_train[1].tolist()) == text[:64]
    assert torch.equal(data.y_train[0, -1], data.x_train[1, 0])  # windows tile the text
    start = int(len(text) * 0.9)
    assert "".join(vocab[i] for i in data.x_test[0].tolist()) == text[start:start + 32]


def test_chars_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_chars(path=tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa" * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_chars(path=tmp_path / "bad.txt")
    (tmp_path / "short.txt").write_text("abc" * 10)
    with pytest.raises(ValueError, match="too short"):
        load_chars(context=64, path=tmp_path / "short.txt")


def _write_cifar(folder, n=4, seed=0):
    """A tiny CIFAR-10 in its python format: 5 training batches and a test batch of n images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = batch
    return batches


def test_cifar10_loader_on_a_tiny_file(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        data = load_data("cifar10", root=root)
        assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).astype(np.float64) / 255
    raw = raw.reshape(20, 3, 32, 32)
    mean, std = raw.mean(axis=(0, 2, 3), keepdims=True), raw.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    torch.testing.assert_close(data.x_train.double(), torch.from_numpy((raw - mean) / std), atol=1e-5, rtol=0)
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing data_batch_1"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs root"):
        load_data("cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3.*corrupt"):
        load_cifar10(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="expected uint8"):
        load_cifar10(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:  # a pickle that would run code is refused
        pickle.dump({b"data": os.getcwd, b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        load_cifar10(tmp_path)


def test_load_data_errors_and_subset():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        load_data("imagenet")
    with pytest.raises(TypeError, match="unknown option"):
        load_data("teacher", colour="red")
    with pytest.raises(ValueError, match="seed"):
        load_data("teacher", seed=-1)
    data = load_data("teacher", max_train=10, max_test=3, n_train=50, n_test=20)
    assert len(data.x_train) == 10 and len(data.x_test) == 3
    assert set(DATASETS) == {"digits", "mnist1d", "listops", "teacher", "teacher-pixelfly", "teacher-dense", "chars",
                             "cifar10"}


def test_listops_long_sequences_within_min_and_max_len():
    # LRA-like nesting; draws stop as soon as they outgrow max_len, so this stays fast
    data = make_listops(n_train=40, n_test=10, max_len=256, max_depth=10, max_args=10, min_len=64, leaf_prob=0.8)
    x = torch.cat([data.x_train, data.x_test])
    lengths = (x > 0).sum(1)
    assert lengths.min() >= 64 and x.shape[1] == 256
    for row, label in zip(x, torch.cat([data.y_train, data.y_test])):
        assert _evaluate_listops(row.tolist()) == int(label)
    with pytest.raises(ValueError, match="min_len"):
        make_listops(n_train=4, n_test=4, max_len=32, min_len=40)
    with pytest.raises(ValueError, match="leaf_prob"):
        make_listops(n_train=4, n_test=4, leaf_prob=0.0)
