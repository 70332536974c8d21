"""A user's own model end to end: helpers that take Hugging Face outputs, the NTK of a transformer
against the exact loop, the one step timer, train(module=...), names and command-line help.

``transformers`` is a test requirement only; every model is built from a small config (no download).
"""

import argparse
import importlib
import os
import pkgutil
import types
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is fetched

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import pixelfly_lab as pl
from pixelfly_lab.cli import build_parser
from pixelfly_lab.outputs import model_output

VOCAB, T = 23, 6      # T x VOCAB = 138 logits: the structured NTK chunks its backward passes (> 128)


def gpt2(seed=0, width=32, dtype=torch.float64):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=VOCAB, n_positions=8, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype).eval()


@dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class Wrapped(nn.Module):
    """An MLP returning a mapping or a dataclass, as many codebases do."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def forward(self, x):
        y = self.net(x)
        return {"logits": y, "aux": 0} if self.kind == "dict" else Out(y, x)


def test_model_output_reads_tensor_mapping_dataclass_and_output_fn():
    y = torch.ones(2, 3)
    assert model_output(y) is y and model_output({"logits": y}) is y and model_output(Out(y, y)) is y
    assert model_output(Out(y, 2 * y), lambda o: o.hidden).sum() == 12
    with pytest.raises(TypeError, match="output_fn"):
        model_output((y, y))
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        model_output(y, lambda o: "no")


@pytest.mark.parametrize("kind", ["dict", "dataclass"])
def test_ntk_of_models_returning_mappings_equals_the_plain_models(kind):
    model, x = Wrapped(kind), torch.randn(4, 5, dtype=torch.float64)
    expected = pl.empirical_ntk(model.net, x, method="loop")
    for method in ("auto", "jacobian", "structured"):
        torch.testing.assert_close(pl.empirical_ntk(model, x, method=method), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("last_only", [False, True])
def test_gpt2_ntk_structured_equals_the_loop(trace, last_only):
    """Hugging Face GPT-2 unwrapped (Conv1D projections, tied head, SDPA attention), float64."""
    model = gpt2()
    x1, x2 = torch.randint(0, VOCAB, (3, T)), torch.randint(0, VOCAB, (2, T))
    kw = {"output_fn": lambda out: out.logits[:, -1]} if last_only else {}
    for second in (None, x2):
        expected = pl.empirical_ntk(model, x1, second, method="loop", trace=trace, **kw)
        for method in ("auto", "structured", "jacobian"):
            got = pl.empirical_ntk(model, x1, second, method=method, trace=trace, **kw)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_gpt2_ntk_has_a_rule_per_conv1d_and_no_vmap_fallback():
    """Every Conv1D gets a structured rule (none falls back with a warning), and attention runs
    on the math kernel: vmap has no batching rule for the fused CPU kernel and would warn of a loop."""
    import warnings

    from pixelfly_lab.ntk.structured import rule_for

    model, x = gpt2(), torch.randint(0, VOCAB, (3, T))
    convs = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(convs) == 8 and all(rule_for(name, m) is not None for name, m in convs)
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kernel = pl.empirical_ntk(model, x, method="structured")
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    assert kernel.shape == (3, 3) and torch.linalg.eigvalsh(kernel).min() > 0


def test_seed_spread_takes_a_hugging_face_factory():
    table = pl.seed_spread(lambda s: gpt2(seed=s), torch.randint(0, VOCAB, (3, T)), seeds=(0, 1),
                           metrics=("cka",), output_fn=lambda out: out.logits[:, -1])
    assert table["metric"].tolist() == ["cka"] and 0 < table["mean"].iloc[0] < 1


def test_time_training_steps_takes_gpt2_unwrapped_and_a_users_loss():
    model = gpt2(dtype=torch.float32).train()
    x = torch.randint(0, VOCAB, (2, T))
    table = pl.time_training_steps({"gpt2": model}, x, x, steps=1, rounds=1, warmup=0)   # default: cross-entropy
    assert table["gmacs"].iloc[0] > 0 and table["step_ms"].iloc[0] > 0
    seen = []

    def loss(output, target):
        seen.append(type(output))
        return output.float().square().mean()

    pl.time_training_steps([Wrapped("dataclass").float()], torch.randn(4, 5), loss_fn=loss, steps=1, rounds=1,
                           warmup=0)
    assert set(seen) == {torch.Tensor}
    with pytest.raises(TypeError, match="output_fn"):
        pl.time_training_steps([Wrapped("dict")], torch.randn(2, 5), output_fn="logits")


def test_train_takes_a_users_model_loss_and_output_fn(tmp_path):
    model = gpt2(dtype=torch.float32).train()
    before = [p.detach().clone() for p in model.parameters()]
    losses = []

    def loss(logits, target):
        value = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        losses.append(float(value.detach()))
        return value

    chars = pl.load_data("chars", context=T)
    # a toy vocabulary: tokens folded into the model's (the loop only needs the shapes right)
    result = pl.train(pl.TrainConfig(data="chars", context=T, epochs=1, batch_size=4, max_train=8, max_test=4,
                                     out=str(tmp_path), progress=False, data_options={}),
                      module=_Folded(model, chars.vocab_size), loss_fn=loss, output_fn=lambda out: out["logits"])
    assert len(losses) == 2 and result.summary["params"] == sum(p.numel() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "val_loss" in result.summary
    with pytest.raises(TypeError, match="module"):
        pl.train(pl.TrainConfig(out=str(tmp_path)), module="gpt2")


class _Folded(nn.Module):
    """GPT-2 with VOCAB tokens read on a larger vocabulary: ids folded in, logits tiled out."""

    def __init__(self, model, vocab):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, x):
        out = self.model(x % VOCAB)
        repeats = -(-self.vocab // VOCAB)
        return {"logits": out.logits.repeat(1, 1, repeats)[..., :self.vocab]}


def test_no_module_is_shadowed_by_a_name_it_defines():
    names = [i.name for i in pkgutil.walk_packages(pl.__path__, "pixelfly_lab.") if not i.name.endswith("__main__")]
    shadowed = []
    for name in names:
        importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        if not isinstance(getattr(importlib.import_module(parent), leaf), types.ModuleType):
            shadowed.append(name)
    assert not shadowed


def _actions(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_command_line_option_has_help():
    missing = [(path, action.option_strings or action.dest) for path, action in _actions(build_parser())
               if not action.help]
    assert not missing
    assert len({path for path, _ in _actions(build_parser())}) >= 3   # reproduce, bench, train at least


# ----------------------------------------------------------------------------- the budget chooser

def _options(*rows):
    return [dict(pattern="dense" if i == 0 else "pixelfly", asked=1.0, block_size=0, params=p, ms=ms)
            for i, (p, ms) in enumerate(rows)]


def test_greedy_plan_meets_a_parameter_budget_and_stops_at_the_speed_target():
    from pixelfly_lab.speed.planner import _greedy

    options = {"a": _options((100, 10.0), (50, 6.0), (20, 3.0)),     # a gains 4 ms for 50 params first
               "b": _options((100, 10.0), (50, 9.0), (20, 8.0))}     # b gains little
    # budget: every layer at the largest option within it
    assert _greedy(["a", "b"], options, 30.0, None, 0.5) == {"a": 1, "b": 1}
    assert _greedy(["a", "b"], options, 30.0, None, 0.3) == {"a": 2, "b": 2}
    # speed-up 30 / 26 needs one move: the best time per parameter (a: 4/50 > b: 1/50)
    assert _greedy(["a", "b"], options, 30.0, 30 / 26, None) == {"a": 1, "b": 0}
    # out of reach: everything at its fastest option
    assert _greedy(["a", "b"], options, 30.0, 10.0, None) == {"a": 2, "b": 2}


def test_plan_model_plans_applies_and_measures_a_users_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    plan = pl.plan_model(model, x, budget=0.5, target=y, budgets=(0.25, 0.5), block_sizes=(16,), rounds=1)
    assert list(plan["name"]) == ["0", "2", "4"] and list(plan["rows"]) == [32, 32, 32]
    sparse = plan[plan["pattern"] == "pixelfly"]
    assert list(sparse["name"]) == ["0", "2"] and (sparse["params_after"] <= 0.5 * sparse["params_before"]).all()
    assert plan["note"].iloc[2].startswith("no Pixelfly plan") and plan.attrs["reached"]   # 64 -> 10: no block 16
    assert plan.attrs["measured_speedup"] > 0 and plan.attrs["predicted_speedup"] > 0
    assert type(model[0]) is nn.Linear                       # the model itself is untouched
    copy_ = __import__("copy").deepcopy(model)
    report = pl.apply_plan(copy_, plan)
    assert list(report["name"]) == list(sparse["name"])
    assert report["params_after"].tolist() == sparse["params_after"].tolist()   # the planned patterns, exactly
    for name in sparse["name"]:
        assert type(copy_.get_submodule(name)).__name__ == "PixelflyLinear"


def test_plan_model_bad_input_names_the_argument():
    model, x = nn.Sequential(nn.Linear(32, 32)), torch.randn(4, 32)
    with pytest.raises(ValueError, match="speedup .* or budget"):
        pl.plan_model(model, x)
    with pytest.raises(ValueError, match="speedup"):
        pl.plan_model(model, x, speedup=0.5)
    with pytest.raises(ValueError, match="budget"):
        pl.plan_model(model, x, budget=1.5)
    with pytest.raises(ValueError, match="no linear layer"):
        pl.plan_model(nn.Sequential(nn.ReLU()), x, budget=0.5)
    with pytest.raises(TypeError, match="example_batch"):
        pl.plan_model(model, [1.0], budget=0.5)
