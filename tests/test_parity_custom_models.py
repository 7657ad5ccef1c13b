"""Parity with the reference library (peft 0.21.2) on the cases of its custom-model test matrix that peftkit
used to refuse (issue 21 items 5 and 6): LoRA on ``nn.MultiheadAttention``, LoRA and DoRA on grouped
convolutions, LN tuning on a ``Linear``; beside them the matrix's other LN-tuning cases, and LoRA on
``nn.TransformerEncoder`` (all-linear one way, the attention modules named the other).

The models are written here with the reference's module names and shapes. Each case runs both ways:
"peftkit->peft" (trained by peftkit, saved with ``peftkit.save_adapter``, loaded with
``peft.PeftModel.from_pretrained``) and "peft->peftkit" (trained by peft, saved with ``save_pretrained``,
loaded with ``peftkit.load_adapter``). Outputs are compared unmerged, merged in place and merged and
unloaded; where the reference cannot merge (grouped convolutions) both libraries must refuse. A fresh
adapter from the same config has the same tensor names and shapes in both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import AdapterNameError, UnsupportedLayerError
from peftkit.methods.ln_tuning import LNTuningConfig
from support.attention import WIDTH, Encoder

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:.*is_gradient_checkpointing.*:FutureWarning",
        "ignore:Unsupported layer type:UserWarning",  # the reference's LN tuning on any non-linear module
        "ignore:LoRA adapter added to ConvNd layer with groups:UserWarning",
        "ignore:All adapters are already merged:UserWarning",  # the reference's MHA merges inside its forward
    ),
    pytest.mark.usefixtures("one_thread"),
]

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402

ATOL = 1e-5
STEPS, LR = 4, 2e-2


# -- the reference's custom models (their module names and shapes) ------------------------------------


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(x, x, x)
        return self.sm(self.lin0(out))


class Conv2dGroups(nn.Module):
    """A linear layer reshaped into a 16-channel 3x3 image, a 16 -> 16 conv in 8 groups (r=8 fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv2d(self.lin0(x.flatten()).reshape(2, 16, 3, 3)))
        return self.sm(self.lin1(h.flatten(1)))


class Conv2dGroups2(nn.Module):
    """A padded 16 -> 32 conv in 2 groups on a fixed 20x20 image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(32 * 20 * 20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.relu(self.conv2d(x)).flatten(1)))


class MlpLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.layernorm1 = nn.LayerNorm(20)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.relu(self.lin0(self.layernorm0(x))))
        return self.sm(self.lin1(self.layernorm1(h)))


class EncoderLogits(Encoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).log_softmax(-1)


def _inputs(model_id: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = {
        "MHA": (9, 10),  # unbatched (sequence, width), as the reference feeds it
        "Conv2dGroups": (9, 10),
        "Conv2dGroups2": (9, 16, 20, 20),
        "MLP_LayerNorm": (9, 10),
        "TransformerEncoder": (3, 5, WIDTH),
    }[model_id]
    return torch.randn(shape, generator=gen)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MHA": Mha,
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "MLP_LayerNorm": MlpLayerNorm,
    "TransformerEncoder": EncoderLogits,
}


@dataclass(frozen=True)
class Case:
    name: str
    model_id: str
    method: str  # "lora" or "ln_tuning"
    options: dict = field(default_factory=dict)
    mergeable: bool = True


# The reference matrix's cases peftkit refused (4 grouped conv, 2 MHA, 2 LN tuning on a Linear), and its
# other LN tuning cases beside them.
CASES = [
    Case("MHA 1 LoRA", "MHA", "lora", {"target_modules": ["mha"]}),
    Case("MHA 2 LoRA", "MHA", "lora", {"target_modules": ["mha", "lin0"]}),
    Case("Conv2d Groups LoRA", "Conv2dGroups", "lora", {"target_modules": ["conv2d"]}, mergeable=False),
    Case("Conv2d Groups2 LoRA", "Conv2dGroups2", "lora", {"target_modules": ["conv2d"]}, mergeable=False),
    Case(
        "Conv2d Groups LoRA with DoRA",
        "Conv2dGroups",
        "lora",
        {"target_modules": ["conv2d"], "use_dora": True},
        mergeable=False,
    ),
    Case(
        "Conv2d Groups2 LoRA with DoRA",
        "Conv2dGroups2",
        "lora",
        {"target_modules": ["conv2d"], "use_dora": True},
        mergeable=False,
    ),
    Case("LayerNorm 1 LNTuning", "MLP_LayerNorm", "ln_tuning", {"target_modules": "layernorm0"}),
    Case("LayerNorm 2 LNTuning", "MLP_LayerNorm", "ln_tuning", {"target_modules": ["layernorm0"]}),
    Case(
        "LayerNorm 3 LNTuning",
        "MLP_LayerNorm",
        "ln_tuning",
        {"target_modules": ["layernorm0"], "modules_to_save": ["layernorm1"]},
    ),
    Case("Linear 4 LNTuning", "MLP_LayerNorm", "ln_tuning", {"target_modules": "lin0"}),
    Case("Linear 5 LNTuning", "MLP_LayerNorm", "ln_tuning", {"target_modules": ["lin0"]}),
    # beyond the reference's matrix: the attention modules of a torch TransformerEncoder, named
    Case(
        "TransformerEncoder LoRA", "TransformerEncoder", "lora", {"target_modules": ["self_attn", "linear1"]}
    ),
]


@pytest.fixture(autouse=True)
def regular_attention_path():
    """The reference's adapters inside nn.TransformerEncoderLayer are skipped by torch's fused eval-mode
    kernel (peftkit's are not: core/inject.py); comparisons run torch's regular path, where both apply."""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


def _base(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_id]().eval()


def _configs(case: Case):
    options = copy.deepcopy(case.options)  # peft edits list fields in place
    if case.method == "lora":
        return peftkit.LoraConfig(**options), peft.LoraConfig(**copy.deepcopy(case.options))
    return LNTuningConfig(**options), peft.LNTuningConfig(**copy.deepcopy(case.options))


def _train(model: nn.Module, model_id: str) -> None:
    torch.manual_seed(2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    for step in range(STEPS):
        out = model(_inputs(model_id, seed=10 + step))
        out[..., 0].mean().backward()  # push the log-probability of class 0 up
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _out(model: nn.Module, model_id: str) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs(model_id, seed=1))


def _close(ours: nn.Module, theirs: nn.Module, case: Case, base: torch.Tensor) -> None:
    a, b = _out(ours, case.model_id), _out(theirs, case.model_id)
    assert (a - base).abs().max() > 1e-3, (
        "the adapter does not change the output: the comparison proves nothing"
    )
    assert (a - b).abs().max() <= ATOL, f"{case.name}: peftkit vs peft max abs diff {(a - b).abs().max():.3e}"


def _pair(direction: str, case: Case, directory: Path) -> tuple[nn.Module, nn.Module]:
    ours_config, theirs_config = _configs(case)
    torch.manual_seed(0)
    if direction == "peftkit->peft":
        ours = peftkit.inject(_base(case.model_id), ours_config)
        _train(ours, case.model_id)
        peftkit.save_adapter(ours, directory)
        theirs = peft.PeftModel.from_pretrained(_base(case.model_id), directory).eval()
    else:
        theirs = peft.get_peft_model(_base(case.model_id), theirs_config)
        _train(theirs, case.model_id)
        theirs.save_pretrained(directory)
        ours = peftkit.load_adapter(_base(case.model_id), directory).eval()
    return ours, theirs


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_outputs_agree_unmerged_merged_and_unloaded(direction, case, tmp_path):
    base = _out(_base(case.model_id), case.model_id)
    ours, theirs = _pair(direction, case, tmp_path / "adapter")
    _close(ours, theirs, case, base)
    if not case.mergeable:  # both libraries refuse, and neither changed anything
        with pytest.raises(AdapterNameError, match="dense kernel"):
            peftkit.merge(ours, safe=True)
        with pytest.raises(NotImplementedError, match="groups > 1"):
            theirs.merge_adapter()
        _close(ours, theirs, case, base)
        return
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    _close(ours, theirs, case, base)
    _close(peftkit.unload(ours, merge=True), theirs.merge_and_unload(), case, base)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_fresh_adapter_has_the_same_tensors_in_both(case):
    ours_config, theirs_config = _configs(case)
    ours = peftkit.inject(_base(case.model_id), ours_config)
    theirs = peft.get_peft_model(_base(case.model_id), theirs_config)
    shapes = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(ours).items()}
    assert shapes == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert peftkit.trainable_summary(ours, show=False).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )


# -- all-linear on nn.TransformerEncoder ------------------------------------------------------------------


def test_all_linear_takes_the_attention_modules_and_the_reference_reads_it(tmp_path):
    """peftkit's all-linear adapts each nn.MultiheadAttention whole and records the names; the reference
    loads that as the same adapter."""
    case = Case("all-linear", "TransformerEncoder", "lora")
    base = _out(_base("TransformerEncoder"), "TransformerEncoder")
    ours = peftkit.inject(_base("TransformerEncoder"), peftkit.LoraConfig(target_modules="all-linear"))
    _train(ours, "TransformerEncoder")
    peftkit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_base("TransformerEncoder"), tmp_path / "a").eval()
    assert (
        sum(
            type(m).__name__ == "MultiheadAttention" and isinstance(m, peft.tuners.lora.LoraLayer)
            for m in theirs.modules()
        )
        == 2
    )
    _close(ours, theirs, case, base)
    peftkit.merge(ours)
    theirs.merge_adapter()
    _close(ours, theirs, case, base)


def test_the_references_all_linear_wraps_out_proj_which_attention_never_calls(tmp_path):
    """What the reference's all-linear does on nn.TransformerEncoder (docs/interchange.md): it adapts each
    out_proj as a linear layer, which nn.MultiheadAttention reads without calling, so that adapter acts
    only once merged. peftkit refuses such a file and says what to target instead."""
    base_model = _base("TransformerEncoder")
    theirs = peft.get_peft_model(
        copy.deepcopy(base_model), peft.LoraConfig(target_modules="all-linear", init_lora_weights=False)
    )
    assert "encoder.layers.0.self_attn.out_proj" in theirs.peft_config["default"].target_modules
    only_out_proj = peft.get_peft_model(
        copy.deepcopy(base_model), peft.LoraConfig(target_modules=["out_proj"], init_lora_weights=False)
    )
    assert torch.equal(_out(only_out_proj, "TransformerEncoder"), _out(base_model, "TransformerEncoder"))
    only_out_proj.merge_adapter()
    assert not torch.allclose(
        _out(only_out_proj, "TransformerEncoder"), _out(base_model, "TransformerEncoder")
    )
    theirs.save_pretrained(tmp_path / "a")
    with pytest.raises(UnsupportedLayerError, match=r"target the attention module \('self_attn'\)"):
        peftkit.load_adapter(_base("TransformerEncoder"), tmp_path / "a")
