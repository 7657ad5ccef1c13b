"""bitsandbytes backend: LoRA and (IA)³ on ``bnb.nn.Linear4bit`` (NF4/FP4) and ``bnb.nn.Linear8bitLt``.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the frozen base weight is stored in 4 bits and
dequantized block by block inside the base layer's own forward; the adapter runs beside that call in
float32 on the layer's input, so only the adapter's few parameters see gradients and optimizer state.

Merging dequantizes the weight, adds the delta exactly, and quantizes the sum again: the stored merged
weight differs from the exact one by the quantization error, which :func:`_write_4bit` /
:func:`_write_8bit` measure and the core reports (``AdapterLayer.quantization_error``).

Nothing here imports bitsandbytes until a bitsandbytes layer is dispatched (or :func:`quantize` is
called): its import alone takes seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..core.registry import BaseAccess
from ..errors import ConfigError, UnsupportedLayerError
from ..methods.ia3 import IA3Adapter, IA3Linear
from ..methods.lora import LoraAdapter, LoraLinear
from ..methods.lora_init import initialise_linear

if importlib.util.find_spec("bitsandbytes") is None:  # the package's guard skips this backend
    raise ImportError("bitsandbytes is not installed; `pip install bitsandbytes` for 4-bit/8-bit base models")

INSTALL_HINT = "pip install bitsandbytes (or `pip install peftkit[quantization]`)"
QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # bitsandbytes' default 4-bit block; its CPU kernels want in_features divisible by it


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


# -- adapters ------------------------------------------------------------------------------------


class LoraQuantLinear(LoraLinear):
    """LoRA beside a bitsandbytes linear layer. The packed weight has no usable shape (a 4-bit one is
    stored as ``(out*in/2, 1)`` bytes), so the sizes come from ``in_features``/``out_features``; A and B
    are float32 whatever the compute dtype, as in the reference library's QLoRA set-up."""

    supports_svd_init = False  # PiSSA/OLoRA would decompose, and rewrite, the quantized weight

    def __init__(self, base_layer: nn.Linear, **values: Any) -> None:
        if values.get("use_dora"):
            raise UnsupportedLayerError(
                f"DoRA (use_dora=True) is not supported on a quantized {type(base_layer).__name__}; use plain "
                "LoRA (use_dora=False), or leave these layers unquantized (quantize(..., skip=[...]))"
            )
        if values.get("init") == "lora_ga":
            raise UnsupportedLayerError(
                f"init_lora_weights='lora_ga' offsets the base weight by its first B A, which this quantized "
                f"{type(base_layer).__name__} cannot hold exactly (the reference refuses it too): use an unquantized "
                "base (model.quantize: null), or another init"
            )
        if values.get("init") == "loftq":
            raise UnsupportedLayerError(
                f"init_lora_weights='loftq' needs the full-precision weights, and this {type(base_layer).__name__} "
                "is already quantized: load the model unquantized (model.quantize: null, or no "
                "quantization_config), inject with LoftQ, which quantizes the base itself, and save that base"
            )
        if values.get("lora_bias"):
            raise UnsupportedLayerError(
                f"lora_bias=True is not supported on a quantized {type(base_layer).__name__}; use lora_bias=False, "
                "or leave these layers unquantized (quantize(..., skip=[...]))"
            )
        LoraAdapter.__init__(self, **values)
        device = base_layer.weight.device
        kw = {"bias": False, "device": device, "dtype": torch.float32}
        self.transposed = False
        self.lora_A = nn.Linear(base_layer.in_features, self.r, **kw)
        self.lora_B = nn.Linear(self.r, base_layer.out_features, **kw)
        initialise_linear(self, self.lora_A.weight, self.lora_B.weight, torch.empty(0))

    def attach(self, base_layer: nn.Module) -> None:
        _make_trainable(base_layer)
        super().attach(base_layer)


class IA3QuantLinear(IA3Linear):
    """(IA)³ on a bitsandbytes linear layer: the vector scales the layer's input or output, so the
    quantized matmul itself is untouched; merging scales the dequantized weight and re-quantizes."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool, init: bool) -> None:
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        IA3Adapter.__init__(self, base_layer, shape, feedforward, init)
        self.transposed = False

    def attach(self, base_layer: nn.Module) -> None:
        _make_trainable(base_layer)
        super().attach(base_layer)


def _make_trainable(base_layer: nn.Module) -> None:
    access = registry.base_access(base_layer)
    if access is not None and access.trainable is not None:
        access.trainable(base_layer)


def _refuse(peft_type: str) -> Any:
    def build(base_layer: nn.Module, **_: Any) -> nn.Module:
        raise UnsupportedLayerError(
            f"{peft_type} cannot adapt a quantized {type(base_layer).__name__} (its weight is packed); "
            "use LoRA or IA3, which have bitsandbytes rows, or leave these layers unquantized "
            "(quantize(..., skip=[...]) / model.quantize: null)"
        )

    return build


# -- reading and writing the quantized weight -----------------------------------------------------


def _error(stored: torch.Tensor, exact: torch.Tensor, before: torch.Tensor) -> dict[str, float]:
    """How far the stored weight is from the exact one: max abs, relative to the exact weight, and
    relative to the change being written (a delta smaller than the quantization step is largely
    rounded away: ``of_delta`` near 1 means the merge kept little of the adapter)."""
    diff = stored.float() - exact.float()
    norm, change = float(exact.float().norm()), float((exact.float() - before).norm())
    return {
        "max_abs": float(diff.abs().max()),
        "relative": float(diff.norm()) / norm if norm else 0.0,
        "of_delta": float(diff.norm()) / change if change else 0.0,
    }


def _read_4bit(layer: nn.Module, name: str) -> torch.Tensor:
    if name != "weight":
        return getattr(layer, name).detach().float()
    functional = _bnb().functional
    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' first eval-mode forward on an AVX512-BF16 CPU repacks the weight in place for
        # its CPU kernel (block scales un-nested and rounded to bf16). Undo the repacking on copies,
        # keeping those bf16 scales: the weight read is then the one the kernel multiplies with.
        state = copy.deepcopy(state)
        state.original_nested = False  # keep the scales as they are rather than re-quantize them
        data, state = functional._convert_weight_packed_for_cpu_inverse(data, state)
        state.absmax = state.absmax.T.reshape(-1).float()  # stored (in/block, out) for the kernel
    return functional.dequantize_4bit(data, state).float()


def _write_4bit(layer: nn.Module, name: str, dense: torch.Tensor) -> dict[str, float] | None:
    if name != "weight":
        getattr(layer, name).data.copy_(dense.to(getattr(layer, name).dtype))
        return None
    old, before = layer.weight, _read_4bit(layer, "weight")
    new = _bnb().nn.Params4bit(
        dense.detach().float().cpu(),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )
    layer.weight = new.to(old.device)  # quantizes
    return _error(_read_4bit(layer, "weight"), dense, before)


def _scb(layer: nn.Module) -> torch.Tensor:
    # bitsandbytes moves the row scales from the weight to the layer state on the first forward.
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def _read_8bit(layer: nn.Module, name: str) -> torch.Tensor:
    if name != "weight":
        return getattr(layer, name).detach().float()
    # LLM.int8() row-wise absmax: W = CB * SCB / 127
    return layer.weight.data.float() * _scb(layer).float()[:, None] / 127


def _write_8bit(layer: nn.Module, name: str, dense: torch.Tensor) -> dict[str, float] | None:
    if name != "weight":
        getattr(layer, name).data.copy_(dense.to(getattr(layer, name).dtype))
        return None
    device, before = layer.weight.device, _read_8bit(layer, "weight")
    layer.state.CB, layer.state.SCB = None, None  # stale after the swap; the next forward re-reads them
    new = _bnb().nn.Int8Params(dense.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
    layer.weight = new.to(device)  # quantizes
    return _error(_read_8bit(layer, "weight"), dense, before)


def _snapshot_8bit(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.weight, _scb(layer)


def _restore_8bit(layer: nn.Module, snap: tuple[torch.Tensor, torch.Tensor]) -> None:
    weight, scb = snap
    weight.CB = weight.SCB = None  # the state holds them, as after bitsandbytes' own first forward
    layer.weight = weight
    layer.state.CB, layer.state.SCB = weight.data, scb


def _trainable_4bit(layer: nn.Module) -> None:
    """Keep the layer on bitsandbytes' dequantize-then-matmul path, which has a backward pass.

    On a CPU with AVX512-BF16, bitsandbytes' first eval-mode forward repacks the weight for an
    inference kernel that has no backward: after an evaluation, training through the layer (even
    only back to an earlier adapter) fails. This turns that kernel off and undoes a repacking.
    """
    layer.support_avx512bf16_for_cpu = False
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        functional = _bnb().functional
        layer.weight.data, layer.weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
            layer.weight.data, state
        )


def _shape(layer: nn.Module) -> tuple[int, int]:
    return (layer.out_features, layer.in_features)


def _dense(layer: nn.Module, read: Any) -> nn.Linear:
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    weight = read(layer, "weight")
    out = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach().to(dtype))
    out.weight.requires_grad_(False)
    if out.bias is not None:
        out.bias.requires_grad_(layer.bias.requires_grad)
    return out.train(layer.training)


# -- registration ---------------------------------------------------------------------------------


class _CastNotice(logging.Filter):
    """Drops bitsandbytes' "inputs will be cast ... to float16" line, logged on *every* 8-bit matmul
    with float32 inputs (one per layer per forward pass): expected, and it buries a run's own log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def register() -> None:
    """Add the bitsandbytes rows in front of every method's table (called once, lazily)."""
    bnb = _bnb()
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CastNotice())
    four, eight = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
    registry.register_base_access(
        BaseAccess(
            (four,),
            _read_4bit,
            _write_4bit,
            lambda m: _dense(m, _read_4bit),
            snapshot=lambda m: m.weight,
            restore=lambda m, w: setattr(m, "weight", w),
            shape=_shape,
            trainable=_trainable_4bit,
        )
    )
    registry.register_base_access(
        BaseAccess(
            (eight,),
            _read_8bit,
            _write_8bit,
            lambda m: _dense(m, _read_8bit),
            _snapshot_8bit,
            _restore_8bit,
            _shape,
        )
    )
    supported = {
        "LORA": (LoraQuantLinear, "Linear4bit/8bit (bitsandbytes)"),
        "IA3": (IA3QuantLinear, "Linear4bit/8bit (bitsandbytes)"),
    }
    for peft_type in registry.registered_methods():
        if peft_type in supported:
            build, kind = supported[peft_type]
            registry.register_layer(peft_type, kind, (four, eight), build, first=True)
        elif any(issubclass(four, t) for row in registry.method(peft_type).rows for t in row.base_types):
            # the plain nn.Linear row would otherwise take the quantized subclass and misread its weight
            registry.register_layer(
                peft_type, "Linear4bit/8bit (unsupported)", (four, eight), _refuse(peft_type), first=True
            )


registry.register_backend("bitsandbytes", register)


# -- round trips for inits that must see the quantized weight (LoRA's LoftQ) ----------------------


def _roundtrip_nf4(weight: torch.Tensor) -> torch.Tensor:
    """NF4 with 64-value blocks and float32 scales (no double quantization), as the reference library's
    LoftQ quantizes: the weight a 4-bit base holds once this weight is loaded into it."""
    bnb = _bnb()
    packed = bnb.nn.Params4bit(
        weight.detach().float().cpu(),
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
    ).to(weight.device)
    return bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()


def _roundtrip_int8(weight: torch.Tensor) -> torch.Tensor:
    """LLM.int8()'s row-wise absmax, dequantized as bitsandbytes does (``CB * SCB / 127``)."""
    bnb = _bnb()
    packed = bnb.nn.Int8Params(weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
    packed = packed.to(weight.device)
    return bnb.functional.int8_vectorwise_dequant(packed.data, packed.SCB).float()


registry.register_quantizer(4, _roundtrip_nf4)
registry.register_quantizer(8, _roundtrip_int8)


# -- quantizing a loaded model in place -----------------------------------------------------------


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by bitsandbytes quantized ones, in place.

    Left unquantized: a freshly initialised sequence-classification head (``classifier``/``score``),
    the output embedding (``lm_head``, often tied to the input embedding), every module whose name
    ends with an entry of ``skip`` (and everything inside it), and 4-bit layers whose ``in_features``
    is not a multiple of 64 (bitsandbytes' block; a warning names them).

    Args:
        model: The model to change; quantize before :func:`peftkit.inject`.
        bits: 4 (NF4/FP4) or 8 (LLM.int8()).
        quant_type: "nf4" or "fp4" for 4 bits (ignored for 8).
        double_quant: 4 bits: also quantize the per-block scales (QLoRA's double quantization).
        compute_dtype: The dtype the 4-bit matmul dequantizes to; default: the weight's own dtype.
        skip: Module name suffixes to keep in full precision (e.g. ``["pooler.dense"]``).

    Returns:
        The same model object.

    Raises:
        ConfigError: an invalid ``bits``/``quant_type``, or the model already holds adapters.
    """
    problems = []
    if bits not in (4, 8):
        problems.append(f"bits: expected 4 or 8, got {bits!r}")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        problems.append(f"quant_type: expected 'nf4' or 'fp4' for 4 bits, got {quant_type!r}")
    if "_peftkit" in model.__dict__:
        problems.append("the model already holds peftkit adapters: quantize the base first, then inject")
    if problems:
        raise ConfigError(problems, what="quantize")
    bnb = _bnb()
    registry.load_backend("bitsandbytes")
    keep = [*skip, *_fresh_heads(model)]
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    kept = [n for n in names if any(n == s or n.endswith("." + s) or n.startswith(s + ".") for s in keep)]
    odd = [n for n in names if bits == 4 and n not in kept and model.get_submodule(n).in_features % BLOCKSIZE]
    if odd:
        warnings.warn(
            f"left {len(odd)} linear layer(s) unquantized, their in_features not a multiple of "
            f"{BLOCKSIZE}: {odd[:5]}",
            stacklevel=2,
        )
    for name in names:
        if name in kept or name in odd:
            continue
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(bnb, linear, bits, quant_type, double_quant, compute_dtype))
    return model


def _fresh_heads(model: nn.Module) -> list[str]:
    from ..core.targeting import sequence_head_names

    heads = list(sequence_head_names(model))
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    heads += [n for n, m in model.named_modules() if out is not None and m is out]
    return heads


def _quantized(
    bnb: Any,
    linear: nn.Linear,
    bits: int,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype | None,
) -> nn.Module:
    weight, bias = linear.weight.detach(), linear.bias
    has_bias = bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.float().cpu(),
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
    else:
        # threshold 0: no outlier decomposition, every column int8 (the only mode bitsandbytes runs on CPU)
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer = layer.to(weight.device).train(linear.training)  # .to() is where bitsandbytes quantizes
    if bits == 4:
        _trainable_4bit(layer)
    return layer


def bnb_config(quant: str, double_quant: bool, compute_dtype: torch.dtype, skip: list[str]) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantize`` (``nf4``/``fp4``/``int8``).

    ``skip`` goes to ``llm_int8_skip_modules``: it replaces transformers' default list, so the caller
    names every module to keep (the fresh head, ``lm_head``).
    """
    from transformers import BitsAndBytesConfig

    registry.load_backend("bitsandbytes")  # the rows and the log filter, before any layer exists
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_threshold=0.0)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )
