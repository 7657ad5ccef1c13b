"""Automatic selection (``peftkit.select``): the allocation's arithmetic, the probe's scores, and the
chosen adapter realised on real model classes (its trainable parameters equal the allocation exactly)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peftkit
import peftkit.core.inject
from peftkit.errors import ConfigError
from peftkit.select import (
    LowRank,
    WholeParams,
    allocate,
    find_candidates,
    parse_budget,
    probe,
    random_allocation,
    select,
)

# -- the allocation ------------------------------------------------------------------------------


def lr(name: str, rows: int = 4, cols: int = 4) -> LowRank:
    return LowRank(name, "Linear", rows, cols, rows)


def test_greedy_buys_the_most_gain_per_parameter_and_stops_at_the_budget():
    cands = [lr("a"), lr("b")]  # 8 parameters per rank each
    gains = {"a": [10.0, 1.0, 0.5, 0.1], "b": [4.0, 3.0, 2.0, 0.0]}
    out = allocate(cands, gains, [], {}, budget=24)
    assert out.ranks == {"a": 1, "b": 2}  # a1 (10), b1 (4), b2 (3); a2 (1) loses to b2
    assert out.used == 24 and out.gain == pytest.approx(17.0)
    assert allocate(cands, gains, [], {}, budget=23).used == 16  # the third rank no longer fits


def test_ranks_are_integers_within_bounds_and_capped_by_the_weight():
    cands = [lr("a", 3, 50), lr("b")]
    gains = {"a": [5.0] * 10, "b": [1.0] * 10}
    out = allocate(cands, gains, [], {}, budget=10_000, min_rank=2, max_rank=3)
    assert out.ranks == {"a": 3, "b": 3}
    assert all(isinstance(r, int) and 2 <= r <= 3 for r in out.ranks.values())
    out = allocate([lr("a", 3, 50)], {"a": [5.0] * 10}, [], {}, budget=10_000, max_rank=64)
    assert out.ranks == {"a": 3}  # never beyond min(rows, cols)


def test_min_rank_is_bought_as_one_block():
    out = allocate([lr("a")], {"a": [1.0, 1.0, 1.0]}, [], {}, budget=20, min_rank=3)
    assert out.ranks == {} and out.used == 0  # 3 ranks cost 24 > 20: nothing partial
    assert allocate([lr("a")], {"a": [1.0, 1.0, 1.0]}, [], {}, budget=24, min_rank=3).ranks == {"a": 3}


def test_ties_are_broken_by_model_order_deterministically():
    cands = [lr("first"), lr("second"), lr("third")]
    gains = {n.name: [1.0, 1.0] for n in cands}
    out = allocate(cands, gains, [], {}, budget=16)
    assert list(out.ranks) == ["first", "second"]
    assert out == allocate(cands, gains, [], {}, budget=16)


def test_zero_gain_is_never_bought_even_with_budget_left():
    out = allocate([lr("dead"), lr("live")], {"dead": [0.0, 0.0], "live": [1.0]}, [], {}, budget=1000)
    assert out.ranks == {"live": 1} and out.used == 8


def test_whole_parameters_shared_between_candidates_are_paid_once():
    norm = WholeParams("ln", "LayerNorm", "module", {"ln.weight": 4, "ln.bias": 4})
    biases = WholeParams("(all biases)", "bias", "bias", {"ln.bias": 4, "fc.bias": 4})
    gains = {"ln.weight": 8.0, "ln.bias": 4.0, "fc.bias": 4.0}
    out = allocate([], {}, [norm, biases], gains, budget=12)
    assert out.whole == ["ln", "(all biases)"] and out.used == 12  # the LayerNorm bias counted once
    assert out.gain == pytest.approx(16.0)


def test_dora_magnitudes_are_paid_with_the_first_rank():
    cand = LowRank("a", "Linear", 6, 4, 6)
    out = allocate([cand], {"a": [1.0, 1.0]}, [], {}, budget=26, per_module=True)
    assert out.ranks == {"a": 2} and out.used == 10 + 6 + 10


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=6),
    raw=st.lists(
        st.lists(st.floats(0, 10, allow_subnormal=False), min_size=1, max_size=8), min_size=6, max_size=6
    ),
    budget=st.integers(0, 400),
    min_rank=st.integers(1, 3),
)
def test_any_allocation_respects_the_budget_and_leaves_no_affordable_gain(shapes, raw, budget, min_rank):
    cands = [LowRank(f"m{i}", "Linear", r, c, r) for i, (r, c) in enumerate(shapes)]
    gains = {c.name: sorted(raw[i], reverse=True) for i, c in enumerate(cands)}
    out = allocate(cands, gains, [], {}, budget, min_rank=min_rank, max_rank=8)
    assert out.used == sum(out.ranks[c.name] * c.cost_per_rank for c in cands if c.name in out.ranks)
    assert out.used <= budget
    for c in cands:  # maximal: no further rank with positive gain still fits
        have = out.ranks.get(c.name, 0)
        step = min_rank if have == 0 else 1
        nxt = gains[c.name][have : have + step]
        fits = have + step <= min(8, c.max_rank) and step * c.cost_per_rank <= budget - out.used
        assert not (fits and len(nxt) == step and sum(nxt) > 0)


def test_random_control_is_seeded_within_budget_and_skips_embeddings():
    cands = [lr(f"m{i}") for i in range(10)] + [LowRank("emb", "Embedding", 100, 4, 4)]
    a = random_allocation(cands, 50, rank=2, seed=1)
    assert a == random_allocation(cands, 50, rank=2, seed=1)
    assert a != random_allocation(cands, 50, rank=2, seed=2)
    assert a.used <= 50 and "emb" not in a.ranks and set(a.ranks.values()) <= {1, 2}


@pytest.mark.parametrize(
    ("spec", "count"), [("0.5%", 500), (82944, 82944), ("83k", 83000), ("1.5M", 1_500_000)]
)
def test_budgets_are_read_as_shares_or_counts(spec, count):
    assert parse_budget(spec, 100_000) == count


@pytest.mark.parametrize("spec", [0.005, "half", -3, "0%", True, None])
def test_bad_budgets_say_which_forms_work(spec):
    with pytest.raises(ValueError, match="'0.5%'.*82944"):
        parse_budget(spec, 100)


# -- the probe -----------------------------------------------------------------------------------


class Toy(nn.Module):
    """Two branches: ``dead``'s output is multiplied by zero, so its gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.live = nn.Linear(6, 5)
        self.dead = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.norm(self.live(x) + 0.0 * self.dead(x)))


def toy_batches(n: int = 3):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen)) for _ in range(n)]


def toy_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def batch_gradients(model, batches, weight):
    """``weight``'s gradient on each batch, leaving no gradients behind (the probe starts from none)."""
    grads = []
    for batch in batches:
        model.zero_grad()
        toy_loss(model, batch).backward()
        grads.append(weight.grad.clone())
    for p in model.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("rule", ["gradient", "adam", "fisher"])
def test_a_module_with_zero_gradient_scores_lowest_and_is_not_chosen(rule):
    model = Toy()
    cands = find_candidates(model, always_trained=["head"])
    scores = probe(model, cands, toy_batches(), toy_loss, rule)
    assert scores.rank_gains["dead"] == [0.0] * 5
    assert min(min(g) for g in scores.rank_gains.values()) == 0.0 and scores.rank_gains["live"][0] > 0
    assert all(a >= b for g in scores.rank_gains.values() for a, b in zip(g, g[1:]))  # non-increasing
    chosen = select(model, toy_batches(), toy_loss, 1000, rule=rule, always_trained=["head"])
    assert "dead" not in chosen.allocation.ranks and "live" in chosen.allocation.ranks


def test_gradient_score_is_the_spectrum_of_the_mean_gradient_and_fisher_of_its_second_moment():
    model, batches = Toy(), toy_batches()
    grads = batch_gradients(model, batches, model.live.weight)
    cands = find_candidates(model, always_trained=["head"])
    gradient = probe(model, cands, batches, toy_loss, "gradient")
    expect = torch.linalg.svdvals(torch.stack(grads).mean(0)).pow(2)
    assert torch.allclose(torch.tensor(gradient.rank_gains["live"]), expect, rtol=1e-4, atol=1e-10)
    fisher = probe(model, cands, batches, toy_loss, "fisher")
    moment = sum(g @ g.T for g in grads) / len(grads)
    expect = torch.linalg.eigvalsh(moment).flip(0).clamp_min(0)
    assert torch.allclose(torch.tensor(fisher.rank_gains["live"]), expect, rtol=1e-4, atol=1e-10)
    assert gradient.param_gains["norm.weight"] > 0
    assert gradient.cost.forward_backward_passes == 3 and gradient.cost.stats_bytes > 0
    adam = probe(model, cands, batches, toy_loss, "adam")
    left, singular, _ = torch.linalg.svd(torch.stack(grads).mean(0), full_matrices=False)
    expect = (singular * left.abs().sum(0)).sort(descending=True).values
    assert torch.allclose(torch.tensor(adam.rank_gains["live"]), expect, rtol=1e-4, atol=1e-10)


def test_adam_score_measures_the_side_lora_b_writes_to_for_conv1d_weights():
    from transformers.pytorch_utils import Conv1D

    class Gpt2Like(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = Conv1D(4, 6)  # weight stored in x out = 6 x 4
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.proj(x))

    model, batches = Gpt2Like(), toy_batches()
    grads = batch_gradients(model, batches, model.proj.weight)
    cands = find_candidates(model, always_trained=["head"])
    assert [(c.name, c.output_on_rows, c.out_features) for c in cands.low_rank] == [("proj", False, 4)]
    _, singular, right_t = torch.linalg.svd(torch.stack(grads).mean(0), full_matrices=False)
    expect = (singular * right_t.abs().sum(1)).sort(descending=True).values
    got = probe(model, cands, batches, toy_loss, "adam").rank_gains["proj"]
    assert torch.allclose(torch.tensor(got), expect, rtol=1e-4, atol=1e-10)


def test_activation_score_is_the_output_energy_per_direction_and_needs_no_gradients():
    model, batches = Toy(), toy_batches()
    scores = probe(model, find_candidates(model, always_trained=["head"]), batches, toy_loss, "activation")
    ys = torch.cat([model.live(x) - model.live.bias for x, _ in batches]).detach()
    expect = torch.linalg.eigvalsh(ys.T @ ys / 8 / len(batches)).flip(0)
    assert torch.allclose(torch.tensor(scores.rank_gains["live"]), expect, rtol=1e-4)
    assert scores.cost.forward_backward_passes == 0


def test_the_probe_leaves_flags_modes_and_gradients_as_it_found_them():
    model = Toy().train()
    model.head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    probe(model, find_candidates(model), toy_batches(), toy_loss, "gradient")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.training and all(p.grad is None for p in model.parameters())


def test_unknown_rule_and_empty_batches_are_refused():
    model = Toy()
    with pytest.raises(ValueError, match="gradient, adam, fisher, activation"):
        probe(model, find_candidates(model), toy_batches(), toy_loss, "magic")
    with pytest.raises(ValueError, match="at least one batch"):
        probe(model, find_candidates(model), [], toy_loss)


def test_a_budget_too_small_for_any_adapter_names_the_cheapest():
    with pytest.raises(ValueError, match=r"bought no LoRA adapter.*cheapest rank-1 adapter \(\w+\) costs 11"):
        select(Toy(), toy_batches(), toy_loss, 5, always_trained=["head"], whole_params=False)


# -- realised on real model classes ------------------------------------------------------------


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
    )


def tiny_llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )


def seq_batches():
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 50, (4, 10), generator=gen),
            "labels": torch.randint(0, 2, (4,), generator=gen),
        }
        for _ in range(3)
    ]


def lm_batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(0, 50, (4, 10), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def hf_loss(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize(
    ("build", "batches", "budget"),
    [
        (tiny_bert_classifier, seq_batches, 900),
        (tiny_llama_lm, lm_batches, 700),
        (tiny_llama_lm, lm_batches, "5%"),
    ],
)
@pytest.mark.parametrize("rule", ["gradient", "adam", "fisher", "activation", "random"])
def test_the_chosen_adapter_trains_exactly_the_allocated_parameters(build, batches, budget, rule):
    model = build()
    chosen = select(
        model,
        batches(),
        hf_loss,
        budget,
        rule=rule,
        adapter={"r": 4, "lora_alpha": 8, "use_dora": rule == "fisher"},
        whole_params=True,
        embeddings=True,
    )
    base_trainable = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith(tuple(chosen.candidates.always_trained))
    )
    config = peftkit.make_config("lora", **{k: v for k, v in chosen.adapter.items() if k != "method"})
    peftkit.inject(model, config)
    summary = peftkit.trainable_summary(model, show=False)
    assert summary.trainable - base_trainable == chosen.allocation.used <= chosen.budget
    ranks = {name: layer.adapters["default"].r for name, layer in peftkit.core.inject.adapter_layers(model)}
    assert ranks == chosen.allocation.ranks
    scale = {
        name: layer.adapters["default"].scaling for name, layer in peftkit.core.inject.adapter_layers(model)
    }
    assert set(round(s, 6) for s in scale.values()) == {2.0}  # alpha/r kept for every rank


def test_chosen_adapter_round_trips_through_the_reference_library(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama_lm()
    chosen = select(
        model,
        lm_batches(),
        hf_loss,
        900,
        adapter={"r": 4, "lora_alpha": 8},
        whole_params=True,
        embeddings=True,
    )
    assert chosen.adapter["rank_pattern"]  # several ranks, so the escaped pattern keys are exercised
    assert all(re.escape(re.sub(r"\\", "", k)) == k for k in chosen.adapter["rank_pattern"])
    peftkit.inject(
        model, peftkit.make_config("lora", **{k: v for k, v in chosen.adapter.items() if k != "method"})
    )
    with torch.no_grad():
        for _, layer in peftkit.core.inject.adapter_layers(model):
            for b in layer.adapters["default"].param_roles()["B"]:  # B starts at zero: move it
                nn.init.normal_(b, std=0.1)
    peftkit.save_adapter(model, tmp_path / "auto")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama_lm(), tmp_path / "auto")
    layers = {
        n: m for n, m in theirs_model.named_modules() if hasattr(m, "r") and "default" in getattr(m, "r", {})
    }
    assert {
        n.removeprefix("base_model.model."): m.r["default"] for n, m in layers.items()
    } == chosen.allocation.ranks
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_the_docs_example_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "select.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "docs/select.md", "exec"), scope)  # noqa: S102 - our own documentation
    chosen = scope["chosen"]
    assert chosen.allocation.used <= chosen.budget and chosen.allocation.ranks
    assert (
        peftkit.trainable_summary(scope["model"], show=False).trainable > chosen.allocation.used
    )  # + the head


def test_embeddings_and_whole_parameters_are_offered_only_when_asked():
    model = tiny_llama_lm()
    plain = find_candidates(model, whole_params=False, embeddings=False)
    assert plain.whole == [] and all(c.kind != "Embedding" for c in plain.low_rank)
    full = find_candidates(model)
    assert any(c.kind == "Embedding" for c in full.low_rank)
    assert {w.kind for w in full.whole} >= {"LlamaRMSNorm"}
    assert "lm_head" not in {c.name for c in full.low_rank}  # the output head is never adapted


# -- starting LoRA A along the probed directions (select/init.py) -----------------------------------


def _gpt2_like():
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(6, 5)
            self.proj = Conv1D(4, 5)  # weight stored in x out = 5 x 4
            self.conv = nn.Conv1d(1, 3, 2)
            self.head = nn.Linear(9, 2)

        def forward(self, x):
            hidden = self.proj(torch.relu(self.linear(x)))
            conv = self.conv(x[:, None, :4]).flatten(1)[:, :5]
            return self.head(torch.cat([hidden, conv], dim=1))

    return Mixed()


def test_gradient_init_points_each_a_row_along_its_direction_keeps_its_norm_and_starts_at_the_base():
    from peftkit.select import init as select_init

    model = _gpt2_like()
    batches = toy_batches()
    chosen = select(
        model, batches, toy_loss, 10_000, adapter={"r": 2, "lora_alpha": 4}, always_trained=["head"]
    )
    assert set(chosen.init) == set(chosen.allocation.ranks) == {"linear", "proj", "conv"}
    for name, rank in chosen.allocation.ranks.items():
        assert chosen.init[name].shape[0] == rank
        # unit rows, mutually orthogonal: singular vectors
        gram = chosen.init[name] @ chosen.init[name].T
        assert torch.allclose(gram, torch.eye(rank), atol=1e-5)
    x = batches[0][0]
    before = model(x).detach()
    fields = {k: v for k, v in chosen.adapter.items() if k != "method"}
    peftkit.inject(model, peftkit.make_config("lora", **fields))
    layers = dict(peftkit.core.inject.adapter_layers(model))
    norms = {
        n: layers[n]
        .adapters["default"]
        .lora_A.weight.reshape(chosen.allocation.ranks[n], -1)
        .norm(dim=1)
        .clone()
        for n in chosen.init
    }
    assert select_init.apply(model, chosen.init, "default") == 3
    for name, rows in chosen.init.items():
        a = layers[name].adapters["default"].lora_A.weight.reshape(rows.shape[0], -1)
        assert torch.allclose(a.norm(dim=1), norms[name], atol=1e-6)  # LoRA's own scale kept
        cosine = (a / a.norm(dim=1, keepdim=True) * rows).sum(1)
        assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)
    assert torch.equal(model(x).detach(), before)  # B is still zero


def test_the_init_directions_are_the_input_side_singular_vectors_of_the_mean_gradient():
    model, batches = Toy(), toy_batches()
    grads = batch_gradients(model, batches, model.live.weight)
    scores = probe(model, find_candidates(model, always_trained=["head"]), batches, toy_loss, "gradient")
    _, _, right_t = torch.linalg.svd(torch.stack(grads).mean(0), full_matrices=False)
    got = scores.directions["live"]
    # singular vectors are defined up to sign
    assert torch.allclose((got * right_t[: got.shape[0]]).sum(1).abs(), torch.ones(got.shape[0]), atol=1e-4)
    assert not probe(
        model, find_candidates(model, always_trained=["head"]), batches, toy_loss, "fisher"
    ).directions


def test_random_init_and_scores_without_directions_leave_lora_as_it_is():
    model = _gpt2_like()
    assert select(model, toy_batches(), toy_loss, 10_000, init="random", always_trained=["head"]).init == {}
    assert (
        select(model, toy_batches(), toy_loss, 10_000, rule="activation", always_trained=["head"]).init == {}
    )
    with pytest.raises(ValueError, match="unknown selection init 'svd'; choose one of gradient, random"):
        select(model, toy_batches(), toy_loss, 10_000, init="svd", always_trained=["head"])


def test_directions_that_do_not_fit_the_adapter_are_refused_with_the_fix(tmp_path):
    from peftkit.select import init as select_init

    model = _gpt2_like()
    peftkit.inject(model, peftkit.make_config("lora", r=2, target_modules=["linear"]))
    with pytest.raises(ConfigError, match=r"(?s)linear: LoRA A is \(2, 6\).*\(3, 6\).*select again"):
        select_init.apply(model, {"linear": torch.randn(3, 6)}, "default")
    with pytest.raises(ConfigError, match="proj: no LoRA adapter 'default'"):
        select_init.apply(model, {"proj": torch.randn(2, 5)}, "default")
    select_init.save({"linear": torch.randn(2, 6)}, tmp_path / "init.safetensors")
    assert select_init.load(tmp_path / "init.safetensors")["linear"].shape == (2, 6)
    with pytest.raises(
        ConfigError, match="does not exist; it is the init.safetensors that `peftkit select` writes"
    ):
        select_init.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        select_init.load(tmp_path / "bad.safetensors")


def test_grouped_convolutions_and_attention_modules_are_no_low_rank_candidates():
    # LoRA takes them, but a grouped conv's ranks come in multiples of its groups and its delta is dense,
    # and nn.MultiheadAttention has no single weight: the budget model prices neither
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1), nn.MultiheadAttention(4, 2))
    assert [c.name for c in find_candidates(model, always_trained=[]).low_rank] == ["1"]
