"""EVA (explained variance adaptation): the algebra of its start, its rank redistribution, parity with the
reference library's ``get_eva_state_dict`` and adapter files both ways."""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from peft.tuners.lora.eva import get_eva_state_dict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods import lora_eva

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def _batches(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 64, (4, 16), generator=g),
            "attention_mask": torch.ones(4, 16, dtype=torch.long),
        }
        for _ in range(n)
    ]


class TwoInputs(nn.Module):
    """Two linear layers reading different halves of the input: ``low`` sees variance along one direction
    (plus a little noise), ``even`` sees the same variance in every direction."""

    def __init__(self):
        super().__init__()
        self.low, self.even = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.low(x[..., :8]) + self.even(x[..., 8:])


def _two_input_batches(n=8, rows=256):
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    out = []
    for _ in range(n):
        low = torch.randn(rows, 1, generator=g) * 3 * direction + 0.01 * torch.randn(rows, 8, generator=g)
        out.append(torch.cat([low, torch.randn(rows, 8, generator=g)], dim=1))
    return out, direction


def test_a_spans_the_top_singular_directions_of_the_inputs():
    # inputs with a clearly decaying spectrum: the top-2 subspace of the centred activations
    g = torch.Generator().manual_seed(1)
    mix = torch.linalg.qr(torch.randn(8, 8, generator=g))[0] * torch.tensor(
        [9.0, 5, 1, 0.5, 0.3, 0.2, 0.1, 0.1]
    )
    batches = [torch.randn(128, 8, generator=g) @ mix.T + 2.0 for _ in range(6)]
    model = nn.Sequential(nn.Linear(8, 8))
    config = peftkit.LoraConfig(r=2, init_lora_weights="eva", eva_config={"rho": 1.0}, target_modules=["0"])
    plan = peftkit.inject_eva(model, config, batches)
    a = model[0].adapters["default"].lora_A.weight.detach().double()
    x = torch.cat(batches).double()
    top = torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:2]
    assert a.shape == (2, 8) and plan.ranks == {"0": 2}
    assert torch.allclose(a @ a.T, torch.eye(2, dtype=a.dtype), atol=1e-5)  # unit, orthogonal rows
    assert torch.linalg.svdvals(a @ top.T).min() > 0.999  # the same subspace (estimated incrementally)
    assert (model[0].adapters["default"].lora_B.weight == 0).all()


def test_ranks_follow_explained_variance_and_rho():
    batches, direction = _two_input_batches()
    config = peftkit.LoraConfig(r=2, lora_alpha=4, init_lora_weights="eva", target_modules=["low", "even"])
    # rho=2: one direction explains ~all of `low`'s variance, so its second rank goes to `even`
    model = TwoInputs()
    plan = peftkit.inject_eva(model, config, batches)
    assert plan.ranks == {"low": 1, "even": 3} and plan.converged
    assert plan.alphas == {"low": 2.0, "even": 6.0}  # adjust_scaling_factors: alpha / r stays 2
    saved = peftkit.adapter_config(model)
    assert saved.rank_pattern == {"low": 1, "even": 3} and saved.alpha_pattern == {"low": 2, "even": 6}
    assert saved.init_lora_weights == "eva" and saved.eva_config["rho"] == 2.0
    a = model.low.adapters["default"].lora_A.weight.detach()
    assert abs(float(a[0] @ direction)) > 0.999
    # rho=1: no redistribution; adjust_scaling_factors off keeps alpha
    fixed = peftkit.inject_eva(
        TwoInputs(), config.replace(eva_config={"rho": 1, "adjust_scaling_factors": False}), batches
    )
    assert fixed.ranks == {"low": 2, "even": 2} and fixed.alphas == {"low": 4.0, "even": 4.0}


def test_a_layer_left_with_rank_zero_is_not_adapted():
    class Stub:
        def __init__(self, ratios):
            self.ratios = torch.tensor(ratios)

    svds = {"a": Stub([0.9, 0.05]), "b": Stub([0.6, 0.3, 0.1, 0.0]), "c": Stub([0.0, 0.0])}
    ranks = lora_eva._redistribute(svds, {"a": 2, "b": 2, "c": 2}, {"a": 2, "b": 4, "c": 2})
    assert ranks == {"a": 2, "b": 4, "c": 0}  # budget 6: 0.9, 0.6, 0.3, 0.1, 0.05, then b's 0.0 (model order)
    plan = lora_eva.EvaPlan(
        ranks={"0": 2, "1": 0},
        alphas={"0": 8.0, "1": 0.0},
        directions={"0": torch.eye(2, 4), "1": torch.zeros(0, 4)},
        ratios={},
        steps=1,
        converged=True,
    )
    final = lora_eva.eva_config(
        peftkit.LoraConfig(r=1, init_lora_weights="eva", target_modules=["0", "1"]), plan
    )
    assert final.target_modules == ["0"] and final.rank_pattern == {"0": 2}


def test_the_model_starts_at_the_base(llama):
    model = copy.deepcopy(llama)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva", target_modules=TARGETS)
    peftkit.inject_eva(model, config, _batches())
    ids = _batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, llama(ids).logits)


@pytest.mark.filterwarnings("ignore:EVA. the directions")
def test_labels_mask_positions_out():
    # a language model's labels of -100 (prompt, padding) are left out of the SVD when use_label_mask
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    ids = torch.randint(0, 10, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, :2] = ids[:, :2]  # 8 positions left: fewer than round(4 * 2) + ... still enough for k=8
    batch = {"input": ids, "labels": labels}
    seen = []

    def forward(m, b):
        return m(b["input"])

    config = peftkit.LoraConfig(r=4, init_lora_weights="eva", target_modules=["1"])
    orig = lora_eva.IncrementalSVD.update
    lora_eva.IncrementalSVD.update = lambda self, x: (seen.append(x.shape[0]), orig(self, x))[1]
    try:
        lora_eva.eva_plan(model, config, [batch], forward, max_steps=1)
        lora_eva.eva_plan(
            model, config.replace(eva_config={"use_label_mask": False}), [batch], forward, max_steps=1
        )
    finally:
        lora_eva.IncrementalSVD.update = orig
    assert seen == [8, 48]


def test_same_ranks_and_directions_as_the_reference(llama):
    batches = _batches()
    ours = lora_eva.eva_plan(
        copy.deepcopy(llama),
        peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva", target_modules=TARGETS),
        batches,
    )
    config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="eva", target_modules=TARGETS, eva_config=peft.EvaConfig()
    )
    theirs = get_eva_state_dict(copy.deepcopy(llama), batches, config, show_progress_bar=False)
    assert ours.ranks == {name: a.shape[0] for name, a in theirs.items()}
    for name, a in theirs.items():  # the same subspace (both estimate it incrementally)
        assert torch.linalg.svdvals(ours.directions[name].double() @ a.double().T).min() > 0.9999


def _trained(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _batches(1, seed=5)[0]["input_ids"]
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


def test_saved_adapter_loads_in_the_reference(llama, tmp_path):
    model = copy.deepcopy(llama)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva", target_modules=TARGETS)
    peftkit.inject_eva(model, config, _batches())
    _trained(model)
    peftkit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["tau"] == 0.99
    assert saved["rank_pattern"][re.escape("model.layers.0.mlp.down_proj")] == 2
    ids = _batches(1, seed=9)[0]["input_ids"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    ours = peftkit.load_adapter(copy.deepcopy(llama), tmp_path)  # no data needed to load
    with torch.no_grad():
        expected = model(ids).logits
        assert (theirs(ids).logits - expected).abs().max() <= 1e-5
        assert (ours(ids).logits - expected).abs().max() <= 1e-6


def test_reference_eva_adapter_loads_in_peftkit(llama, tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="eva", target_modules=TARGETS, eva_config=peft.EvaConfig()
    )
    theirs = peft.get_peft_model(copy.deepcopy(llama), config)
    peft.initialize_lora_eva_weights(theirs, _batches(), show_progress_bar=False)
    with torch.no_grad():  # B away from zero, so the adapter acts
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(copy.deepcopy(llama), tmp_path)
    ids = _batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        assert (ours(ids).logits - theirs.eval()(ids).logits).abs().max() <= 1e-5


def test_errors_name_the_fix(llama):
    eva = peftkit.LoraConfig(r=4, init_lora_weights="eva", target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"inject_eva\(model, config, batches\)"):
        peftkit.inject(copy.deepcopy(llama), eva)  # no data
    with pytest.raises(ConfigError, match="none were given"):
        peftkit.inject_eva(copy.deepcopy(llama), eva, [])
    with pytest.raises(ConfigError, match=r"eva_config.rho: must be a number >= 1"):
        peftkit.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(ConfigError, match=r"eva_config.tua: unknown option"):
        peftkit.LoraConfig(init_lora_weights="eva", eva_config={"tua": 0.5})
    with pytest.raises(peftkit.errors.UnsupportedLayerError, match="not linear layers: model.embed_tokens"):
        peftkit.inject_eva(copy.deepcopy(llama), eva.replace(target_modules=["embed_tokens"]), _batches(1))
