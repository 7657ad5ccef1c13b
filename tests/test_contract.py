"""The contract every method x layer kind x dtype keeps (STYLE.md rule 10).

Rows come from ``contract_rows/<method>.py``; this file never names a method.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from contract_rows import DTYPES, Row, all_rows, call
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.errors import PeftkitError, UnsafeMergeError

ROWS = all_rows()


def _cases():
    for row in ROWS:
        for kind in row.kinds:
            for dtype in row.dtypes:
                yield pytest.param((row, kind, dtype), id=f"{row.name}-{kind}-{dtype}")


CASES = list(_cases())


def _cast(x, dtype):
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _owned(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (layer adapter, full copy or model part)."""
    return ".adapters." in name or ".copies." in name or name.startswith("peftkit_parts.")


class Case:
    """A model adapted by one contract row, and what it looked like before."""

    def __init__(self, row: Row, kind: str, dtype: str) -> None:
        self.row, self.kind, self.dtype = row, kind, DTYPES[dtype]
        model, x = row.build(kind)
        self.original = copy.deepcopy(model).to(self.dtype).eval()
        self.model = model.to(self.dtype).eval()  # no dropout: outputs must be comparable
        self.x = _cast(x, self.dtype)
        with torch.no_grad():
            self.base_out = call(self.original, self.x)
        if row.inject is None:
            peftkit.inject(self.model, row.config(kind))
        else:  # the row's own way to start the adapter (an init that starts from data)
            row.inject(self.model, row.config(kind), self.x)
        self.fresh_out = self.out()

    def train(self, steps: int = 3) -> None:
        if self.row.optimizer is not None:
            opt = self.row.optimizer(self.model, self.row.lr)
        else:
            opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.row.lr)
        target = torch.randn(self.base_out.shape, generator=torch.Generator().manual_seed(1))
        for _ in range(steps):
            opt.zero_grad()
            loss = (call(self.model, self.x).float() - target).pow(2).mean()
            loss.backward()
            opt.step()

    def out(self) -> torch.Tensor:
        with torch.no_grad():
            return call(self.model, self.x)

    def layers(self) -> list[AdapterLayer]:
        return [m for m in self.model.modules() if isinstance(m, AdapterLayer)]

    def base_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if not _owned(n)}

    def tol(self, fp32: float) -> float:
        # bf16 keeps 8 bits of mantissa: a merged weight is rounded once, so compare at bf16 resolution
        return fp32 if self.dtype == torch.float32 else 3e-2 * max(1.0, self.base_out.abs().max().item())


def _trained(*args) -> Case:
    c = Case(*args)
    c.train()
    return c


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("args", CASES)
def test_fresh_adapter_starts_at_base_and_training_changes_output(args):
    c = Case(*args)
    if c.row.starts_at_base:
        # SVD inits move the residual into the base, so they start at the base only up to rounding
        assert _diff(c.fresh_out, c.base_out) <= c.tol(1e-5)
    else:  # e.g. random inits, soft prompts: the adapter acts from the start
        assert _diff(c.fresh_out, c.base_out) > 1e-4
    c.train()
    assert _diff(c.out(), c.base_out) > 1e-3


@pytest.mark.parametrize("args", CASES)
def test_disabled_equals_base(args):
    c = _trained(*args)
    with peftkit.disable(c.model):
        disabled = c.out()
    if c.row.rewrites_base:
        # PiSSA/OLoRA keep W - s*B0*A0 as the base (as the reference library does): disabling gives
        # that residual model, and unload() gives the original back.
        expected = copy.deepcopy(c.model)
        peftkit.unload(expected)
        unloaded = call(expected, c.x).detach()
        if c.row.unload_restores:
            assert not torch.equal(disabled, unloaded)
        else:  # the init's base is the base for good: disabled and unloaded are that model
            assert torch.equal(disabled, unloaded) and not torch.equal(disabled, c.base_out)
    else:
        assert torch.equal(disabled, c.base_out)
    assert not torch.equal(c.out(), disabled)  # and the adapter is back after the block


@pytest.mark.parametrize("args", CASES)
def test_merged_equals_unmerged_and_unmerge_restores_weights(args):
    c = _trained(*args)
    unmerged = c.out()
    before = c.base_tensors()
    if not c.row.mergeable:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            peftkit.merge(c.model, safe=True)
        assert all(torch.equal(t, before[n]) for n, t in c.base_tensors().items())
        assert torch.equal(c.out(), unmerged)
        return
    peftkit.merge(c.model, safe=True)
    assert c.layers() and all(layer.merged == ["default"] for layer in c.layers())
    assert _diff(c.out(), unmerged) <= c.tol(c.row.tol)
    peftkit.unmerge(c.model)
    for name, tensor in c.base_tensors().items():
        scale = before[name].float().abs().max()
        assert _diff(tensor, before[name]) <= (1e-6 if c.dtype == torch.float32 else 1e-2 * scale), name
    assert _diff(c.out(), unmerged) <= c.tol(c.row.tol)


@pytest.mark.parametrize("args", CASES)
def test_save_then_load_gives_identical_outputs(args, tmp_path):
    c = _trained(*args)
    peftkit.save_adapter(c.model, tmp_path / "a", portable=c.row.save_portable)
    fresh = copy.deepcopy(c.original)
    peftkit.load_adapter(fresh, tmp_path / "a")
    loaded = call(fresh.eval(), c.x).detach()
    if c.row.load_tol:
        assert _diff(loaded, c.out()) <= c.tol(c.row.load_tol)
    else:
        assert torch.equal(loaded, c.out())


@pytest.mark.parametrize("args", CASES)
def test_training_changes_only_adapter_and_saved_module_parameters(args):
    c = Case(*args)
    adapter_params = {n for n, _ in c.model.named_parameters() if _owned(n)}
    before = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    c.train()
    changed = {n for n, p in c.model.named_parameters() if not torch.equal(p, before[n])}
    base_changed = changed - adapter_params
    assert not base_changed, f"base parameters changed: {base_changed}"
    assert any(".adapters.default." in n or n.startswith("peftkit_parts.default.") for n in changed)
    if any(isinstance(m, ModulesToSave) for m in c.model.modules()):
        assert any(".copies.default." in n for n in changed)
    # the declared trainable set is exactly the adapter's own tensors plus the head copy
    trainable = {n for n, p in c.model.named_parameters() if p.requires_grad}
    if c.row.optimizer is not None:  # a method's optimizer may freeze some of them (LoRA-FA's A), for good
        assert trainable and trainable <= adapter_params, "trainable must be adapter tensors only"
        assert not changed & (adapter_params - trainable), "an adapter tensor frozen by the optimizer changed"
    else:
        assert trainable == adapter_params and trainable, (
            "trainable must be exactly the adapter's own tensors"
        )


@pytest.mark.parametrize("args", CASES)
def test_unload_restores_module_types_and_base_output(args):
    c = _trained(*args)
    with peftkit.disable(c.model):
        disabled = c.out()
    types = {n: type(m) for n, m in c.original.named_modules()}
    restored = peftkit.unload(c.model)
    assert restored is c.model
    assert {n: type(m) for n, m in restored.named_modules()} == types
    out = c.out()
    if not c.row.unload_restores:  # the base the init left, exactly
        assert torch.equal(out, disabled)
    elif c.row.rewrites_base:  # W_res + s*B0*A0 is W up to float rounding
        assert _diff(out, c.base_out) <= c.tol(1e-5)
    else:
        assert torch.equal(out, c.base_out)
    assert all(p.requires_grad for p in restored.parameters())  # as before inject


@pytest.mark.parametrize("args", CASES)
def test_unload_with_merge_keeps_the_adapted_function(args):
    c = _trained(*args)
    adapted = c.out()
    if not c.row.mergeable:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            peftkit.unload(c.model, merge=True)
        assert torch.equal(c.out(), adapted)
        return
    types = {n: type(m) for n, m in c.original.named_modules()}
    plain = peftkit.unload(c.model, merge=True)
    assert {n: type(m) for n, m in plain.named_modules()} == types
    assert _diff(call(plain, c.x).detach(), adapted) <= c.tol(c.row.tol)


@pytest.mark.parametrize("args", [c for c in CASES if c.values[0][0].mergeable])
def test_nan_in_adapter_makes_safe_merge_raise_and_leaves_weights(args):
    c = _trained(*args)
    layer = c.layers()[0]
    first = next(p for p in layer.adapters["default"].parameters())
    with torch.no_grad():
        first.view(-1)[0] = float("nan")
    before = c.base_tensors()
    with pytest.raises(UnsafeMergeError, match=f"'default'.*'{layer.module_name}'"):
        peftkit.merge(c.model, safe=True)
    assert all(torch.equal(t, before[n]) for n, t in c.base_tensors().items())
    assert layer.merged == []


def test_every_registered_method_has_a_contract_row():
    from peftkit.core import registry

    covered = {type(row.config(row.kinds[0])).peft_type for row in ROWS}
    assert set(registry.registered_methods()) <= covered


def test_every_method_adapting_parameters_has_a_contract_row_with_parameter_targets():
    from peftkit.core import registry

    adapting = {t for t in registry.registered_methods() if registry.adapts_parameters(t)}
    covered = set()
    for row in ROWS:
        for kind in row.kinds:
            config = row.config(kind)
            if config.parameter_targets() or config.target_modules == "all-linear":
                covered.add(type(config).peft_type)
    assert adapting and adapting <= covered


def test_lora_rows_cover_every_registered_lora_layer_kind():
    from torch import nn

    from peftkit.core import registry
    from support.tiny import build

    # rows of quantized backends (bitsandbytes) have their contract in tests/backends/test_bitsandbytes.py
    rows = [
        row
        for row in registry.method("LORA").rows
        if not row.build.__module__.startswith("peftkit.backends.")
    ]
    kinds = {row.kind for row in rows}
    assert kinds == {"Linear", "Conv1D (GPT-2)", "Embedding", "Conv", "MultiheadAttention"}
    assert isinstance(build("Conv3d")[0].layer, nn.Conv3d)
    lora_kinds = {kind for row in ROWS if row.name.startswith("lora-mha") for kind in row.kinds}
    assert {"MHA", "MHABatchFirst", "TransformerEncoder"} <= lora_kinds
