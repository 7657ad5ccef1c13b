"""LoRA-FA: the projected update, its parity with the reference's optimizer, and plain LoRA files.

Parity: the same LoRA adapter (made by the reference, loaded by peftkit) trained a few steps by
``peftkit.lora_fa_optimizer`` and by ``peft.optimizers.create_lorafa_optimizer`` on the same batches (and
dropout masks) ends with the same B matrices and outputs. The reference runs the projection under
bfloat16 autocast, also on a CPU; with that switched off the two agree to float32 rounding (<= 1e-6), and
as the reference ships them to bfloat16 rounding of the projected gradient.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.lora_fa import FrozenA, LoraFAOptimizer, lora_fa_optimizer
from support import custom_models as cm

peft = pytest.importorskip("peft")
lorafa = pytest.importorskip("peft.optimizers.lorafa")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "lora_fa.md"
STEPS, LR = 5, 1e-2

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


def _lora_b(model: nn.Module, theirs: bool) -> dict[str, torch.Tensor]:
    if theirs:
        root = model.base_model.model
        return {
            n: getattr(root, n).lora_B["default"].weight.detach()
            for n in ("lin0", "lin1")
            if hasattr(getattr(root, n), "lora_B")
        }
    return {
        n: getattr(model, n).adapters["default"].lora_B.weight.detach()
        for n in ("lin0", "lin1")
        if hasattr(getattr(model, n), "adapters")
    }


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = STEPS) -> None:
    model.train()
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks on both sides
        model(cm.inputs(10 + step))[:, 0].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


CASES = {
    "lin0 and lin1": {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"]},
    "modules_to_save": {"r": 4, "lora_alpha": 8, "target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    "patterns and rsLoRA": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["lin0", "lin1"],
        "rank_pattern": {"lin1": 2},
        "alpha_pattern": {"lin1": 3},
        "use_rslora": True,
    },
}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-projection", "reference-bf16-autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_updates_match_the_references_optimizer(case, autocast, tmp_path, monkeypatch):
    if not autocast:
        monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    options = CASES[case]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(cm.base("MLP"), peft.LoraConfig(**copy.deepcopy(options)))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(cm.base("MLP"), tmp_path, is_trainable=True)
    start = {n: b.clone() for n, b in _lora_b(ours, theirs=False).items()}
    _train(ours, lora_fa_optimizer(ours, lr=LR, weight_decay=0.1))
    _train(
        theirs,
        lorafa.create_lorafa_optimizer(
            theirs, r=options["r"], lora_alpha=options["lora_alpha"], lr=LR, weight_decay=0.1
        ),
    )
    # bf16 keeps ~3 digits of the projected gradient; Adam normalises it, so B moves within 1% of its path
    tolerance = 1e-2 * LR * STEPS if autocast else 1e-6
    mine, reference = _lora_b(ours, theirs=False), _lora_b(theirs, theirs=True)
    assert mine.keys() == reference.keys() and mine
    for name in mine:
        assert (mine[name] - start[name]).abs().max() > LR, f"{name}: B did not train"
        assert (mine[name] - reference[name]).abs().max() <= tolerance, name
    a, b = cm.out(ours), cm.out(theirs)
    assert (a - b).abs().max() <= (1e-3 if autocast else 1e-5)


def test_a_is_frozen_and_only_b_and_other_trainables_get_optimizer_state(tmp_path):
    model = peftkit.inject(
        cm.base("MLP"), peftkit.LoraConfig(r=4, target_modules=["lin0"], modules_to_save=["lin1"])
    )
    a_before = model.lin0.adapters["default"].lora_A.weight.detach().clone()
    optimizer = lora_fa_optimizer(model, lr=LR)
    assert isinstance(optimizer, LoraFAOptimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lin0.adapters.default.lora_A.weight" not in trainable
    assert "lin0.adapters.default.lora_B.weight" in trainable
    assert any(".copies.default." in n for n in trainable)
    _train(model, optimizer, steps=2)
    assert torch.equal(model.lin0.adapters["default"].lora_A.weight, a_before)
    held = {id(p) for p in optimizer.state}
    assert id(model.lin0.adapters["default"].lora_A.weight) not in held
    assert id(model.lin0.adapters["default"].lora_B.weight) in held


def test_files_are_plain_lora_files_the_reference_loads(tmp_path):
    model = peftkit.inject(
        cm.base("MLP"), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    )
    a_init = model.lin0.adapters["default"].lora_A.weight.detach().clone()
    _train(model, lora_fa_optimizer(model, lr=LR))
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not any("fa" in k.split("_") for k in config)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert torch.equal(handle.get_tensor("base_model.model.lin0.lora_A.weight"), a_init)
    assert keys == {f"base_model.model.{n}.lora_{s}.weight" for n in ("lin0", "lin1") for s in "AB"}
    theirs = peft.PeftModel.from_pretrained(cm.base("MLP"), tmp_path).eval()
    assert isinstance(theirs.peft_config["default"], peft.LoraConfig)
    assert (cm.out(theirs) - cm.out(model)).abs().max() <= 1e-6


def test_the_projection_is_the_least_squares_fit_of_the_full_gradient():
    """s * g_B' A is the full gradient G of W projected onto A's row space (g_B = s G A^T)."""
    gen = torch.Generator().manual_seed(0)
    a, full = (
        torch.randn(3, 10, generator=gen, dtype=torch.float64),
        torch.randn(6, 10, generator=gen, dtype=torch.float64),
    )
    s = 2.5
    projected = LoraFAOptimizer.projected(s * full @ a.T, FrozenA(a, s))
    best = torch.linalg.lstsq(a.T, full.T).solution.T  # argmin_X || X A - G ||
    assert torch.allclose(s * projected, best, atol=1e-8)


def test_refuses_models_it_cannot_train():
    with pytest.raises(ConfigError, match="no trainable one"):
        lora_fa_optimizer(peftkit.inject(cm.base("MLP"), peftkit.IA3Config(target_modules=["lin0"])), lr=LR)
    dora = peftkit.inject(cm.base("MLP"), peftkit.LoraConfig(target_modules=["lin0"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA"):
        lora_fa_optimizer(dora, lr=LR)
    embedding = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    peftkit.inject(embedding, peftkit.LoraConfig(target_modules=["0"]))
    with pytest.raises(ConfigError, match="A of 0 is all zero"):
        lora_fa_optimizer(embedding, lr=LR)
    assert embedding[0].adapters["default"].lora_embedding_A.requires_grad  # refused: nothing changed
    with pytest.raises(ConfigError, match="betas"):
        LoraFAOptimizer([nn.Parameter(torch.zeros(2))], {}, betas=(0.9, 1.0))


def test_a_run_trains_with_it_through_train_optimizer():
    from peftkit.train import fit
    from support.training import bert_loss, collate, make_examples, no_log, quiet, tiny_bert

    model = tiny_bert()  # LoRA on the query and value projections
    adapters = [m.adapters["default"] for m in model.modules() if hasattr(m, "adapters")]
    a_before = [a.lora_A.weight.detach().clone() for a in adapters]
    b_before = [a.lora_B.weight.detach().clone() for a in adapters]
    result = fit(
        model,
        make_examples(),
        collate,
        bert_loss,
        quiet(steps=2, batch_size=8, optimizer="lora_fa"),
        log=no_log,
    )
    assert result.ok
    assert all(torch.equal(a.lora_A.weight, before) for a, before in zip(adapters, a_before, strict=True))
    assert all(not torch.equal(a.lora_B.weight, before) for a, before in zip(adapters, b_before, strict=True))


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/lora_fa.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOCS), "exec"), {"__name__": "__docs__"})
    assert "LoRA-FA trained 640 parameters" in capsys.readouterr().out
