"""sparsify on Hugging Face models built from small configs (no download): GPT-2, Llama, BERT.

``transformers`` is a test requirement only (requirements-test.txt); the package never imports it.
GPT-2 keeps its projections in ``Conv1D`` (weight (in, out)) and ties lm_head to wte; BERT's
masked-LM decoder is tied to the word embeddings; Llama uses plain nn.Linear with an untied head.
"""

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is fetched

import pytest
import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.pytorch_utils import Conv1D

from pixelfly_lab.nn.layers import PixelflyLinear, StructuredLinear
from pixelfly_lab.nn.sparsification import sparsify

VOCAB, WIDTH, T = 128, 64, 16


def gpt2(dropout=0.0):
    config = GPT2Config(n_layer=2, n_embd=WIDTH, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(config)


def llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


def bert():
    return BertForMaskedLM(BertConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=32,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0))


# (builder, MLP layers that must be replaced, the tied head and what it is tied to, causal)
MODELS = {
    "gpt2": (gpt2, ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj", "transformer.h.0.attn.c_attn"],
             ("lm_head", "transformer.wte"), True),
    "llama": (llama, ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj",
                      "model.layers.0.self_attn.q_proj"], None, True),
    "bert": (bert, ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense",
                    "bert.encoder.layer.0.attention.self.query"], ("cls.predictions.decoder",
                                                                    "bert.embeddings.word_embeddings"), False),
}


def tokens(seed=0, batch=4):
    return torch.randint(1, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("family", MODELS)
def test_sparsify_then_train_20_steps(family):
    build, must, tied, _ = MODELS[family]
    torch.manual_seed(0)
    model = build()
    rows = sparsify(model, "pixelfly", budget=0.5, block_size=16).set_index("name")
    assert rows.loc[must, "replaced"].all(), rows.loc[must, "note"]
    assert all(isinstance(model.get_submodule(name), PixelflyLinear) for name in must)
    if tied:
        head, owner = tied
        assert rows.loc[head, "note"].startswith(f"tied to {owner}") and not rows.loc[head, "replaced"]
        assert model.get_submodule(head).weight is model.get_submodule(owner).weight
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert rows.attrs["budget"] < 1
    ids = tokens()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = loss_of(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gpt2_conv1d_is_replaced_in_its_orientation_and_matches_on_real_activations():
    torch.manual_seed(0)
    model = gpt2()
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()          # (in, out) = (64, 256)
    rows = sparsify(model, "butterfly", budget=0.5, block_size=16, init="project").set_index("name")
    assert rows.loc["transformer.h.0.mlp.c_fc", "source"] == "Conv1D"
    assert rows.loc["transformer.h.0.mlp.c_fc", "shape"] == (256, 64)
    layer = model.transformer.h[0].mlp.c_fc
    torch.testing.assert_close(layer.dense_weight(), before.T * layer.mask())   # S = W0 on the support
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o)))
             for m in model.modules() if isinstance(m, StructuredLinear)]
    model(tokens())
    for hook in hooks:
        hook.remove()
    assert len(seen) == 8
    for module, x, y in seen:
        torch.testing.assert_close(y, F.linear(x, module.dense_weight(), module.bias))


def test_gpt2_tied_head_raises_when_asked_for_by_name():
    with pytest.raises(ValueError, match="tied to 'transformer.wte'"):
        sparsify(gpt2(), include=["transformer.h.*.mlp.*", "lm_head"], block_size=16)


def test_frozen_layers_stay_frozen_and_do_not_move():
    torch.manual_seed(0)
    model = gpt2()
    model.transformer.h[0].requires_grad_(False)
    sparsify(model, "pixelfly", budget=0.5, block_size=16)
    frozen = model.transformer.h[0].mlp.c_fc
    assert isinstance(frozen, PixelflyLinear) and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in model.transformer.h[1].mlp.c_fc.parameters())
    snapshot = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, tokens()).backward()
    optimizer.step()
    assert all(torch.equal(p, snapshot[n]) for n, p in frozen.named_parameters())


def test_eval_mode_is_kept():
    torch.manual_seed(0)
    model = gpt2(dropout=0.5)           # dropout makes two forwards differ in train mode
    ids = tokens()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()
    sparsify(model, "pixelfly", budget=0.5, block_size=16)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(ids).logits, model(ids).logits)


def test_meta_gpt2_sparsifies_and_materialises():
    with torch.device("meta"):
        model = gpt2()
    rows = sparsify(model, "pixelfly", budget=0.5, block_size=16)
    assert rows["replaced"].sum() == 8
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    logits = model(tokens()).logits
    assert logits.shape == (4, T, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    torch.manual_seed(0)
    model = gpt2().to(dtype)
    sparsify(model, "pixelfly", budget=0.5, block_size=16)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model(tokens()).logits.dtype == dtype


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = gpt2()
    sparsify(model, "pixelfly", budget=0.5, block_size=16)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(1)
    fresh = gpt2()
    sparsify(fresh, "pixelfly", budget=0.5, block_size=16)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    ids = tokens()
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_stays_causal(family):
    torch.manual_seed(0)
    model = MODELS[family][0]()
    sparsify(model, "pixelfly", budget=0.5, block_size=16)
    model.eval()
    ids = tokens(batch=2)
    changed = ids.clone()
    changed[:, 10:] = torch.randint(1, VOCAB, (2, T - 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_replaced_layers_start_at_the_scale_hugging_face_initialised():
    torch.manual_seed(0)
    model = gpt2()
    stds = {name: m.weight.std().item() for name, m in model.named_modules() if isinstance(m, Conv1D)}
    sparsify(model, "pixelfly", budget=0.5, block_size=16)                       # init='match'
    for name, std in stds.items():
        assert model.get_submodule(name).dense_weight().std().item() == pytest.approx(std, rel=1e-4)
    for name, std in stds.items():   # GPT-2's N(0, 0.02), residual projections / sqrt(2 n_layer): kept per layer
        expected = 0.02 / (2 * 2) ** 0.5 if name.endswith("c_proj") else 0.02
        assert std == pytest.approx(expected, rel=0.1)


def test_project_starts_a_trained_gpt2_nearer_its_loss_than_a_fresh_start():
    torch.manual_seed(0)
    model = gpt2()
    ids = tokens()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):                                   # a "pretrained" model: this batch memorised a bit
        loss = loss_of(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = loss_of(model, ids).item()
        after = {}
        for init in ("project", "match"):
            clone = GPT2LMHeadModel(model.config)
            clone.load_state_dict(model.state_dict())
            clone.eval()
            rows = sparsify(clone, "pixelfly", budget=0.5, block_size=16, init=init)
            after[init] = loss_of(clone, ids).item()
            if init == "project":
                errors = rows.loc[rows["replaced"], "projection_error"]
                assert errors.between(0, 1).all()
    assert trained < after["project"] < after["match"], (trained, after)
