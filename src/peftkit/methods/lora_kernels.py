"""Fast paths for LoRA on dense linear layers: one fused autograd function for ``W x + b + s B A x``.

The general path (``AdapterLayer`` calls the base layer, then ``LoraAdapter.delta_output``) allocates
three output-sized tensors per layer and step (``B A x``, its scaled copy and the sum), scales the
full-size gradient by ``s`` in backward, sums two input-sized gradients, and with dropout keeps both
a float dropout mask and a dropped copy of the input alive for backward. :class:`LoraLinearFunction`
instead

- adds ``s * (A x) B^T`` into the base output in place (one ``addmm_``, the scaling folded into it);
- saves the input once (the base matmul and ``A`` share it), the ``r``-wide ``A x`` and, with
  dropout, a ``bool`` mask (1 byte an element instead of 8 for mask plus dropped copy);
- applies ``s`` to ``r``-wide tensors in backward and accumulates the low-rank input gradient into
  the base one in place.

It is exact maths with a different rounding order: ``s`` multiplies the ``r``-wide product instead of
the output, and ``addmm_`` rounds ``out + s * A x B^T`` once instead of three times. The base part
(``addmm(bias, x, W^T)``) is the very call ``nn.Linear`` makes, and the dropout mask comes from the
same random stream as ``nn.Dropout``'s, so the same seed drops the same elements.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.registry import base_access
from ..core.targeting import HFConv1D

# forward() of the base layer types whose output is exactly ``addmm(bias, x, weight_as_in_x_out)``
_DENSE_FORWARDS = {nn.Linear.forward: False}
if HFConv1D:
    _DENSE_FORWARDS[HFConv1D.forward] = True  # GPT-2's Conv1D stores its weight (in, out)
_HALF_OR_SINGLE = (torch.float32, torch.bfloat16, torch.float16)

# How often each path ran; tests read this to prove the fast path is taken (a silent fallback to the
# general path would otherwise only show up as a slower benchmark).
calls = {"fused": 0, "general": 0}


def fusable(base_layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the fused function computes the general path's maths for this call (in its own rounding
    order, see the module docstring).

    It needs a dense, frozen weight used as-is by the base layer's own forward (plain ``nn.Linear`` or
    GPT-2 ``Conv1D``: no subclass forward, no quantized backend, no hooks that the bypassed
    ``base_layer(x)`` call would have run), plain tensors (no ``__torch_function__`` subclasses such
    as DTensor, no functorch transform) and one dtype for input, weight and adapter, unless autocast
    is on, where the general path computes every matmul in the autocast dtype anyway.
    """
    if type(base_layer).forward not in _DENSE_FORWARDS or base_access(base_layer) is not None:
        return False
    if base_layer._forward_hooks or base_layer._forward_pre_hooks or nn.modules.module._global_forward_hooks:
        return False
    if nn.modules.module._global_forward_pre_hooks:
        return False
    weight, bias = base_layer.weight, base_layer.bias
    if weight.requires_grad or not x.is_floating_point() or x.dim() < 1 or x.numel() == 0:
        return False  # a trained base weight needs its own gradient: the general path computes it
    tensors = (x, weight, a, b) if bias is None else (x, weight, bias, a, b)
    if torch.overrides.has_torch_function(tensors) or torch._C._are_functorch_transforms_active():
        return False
    if len({t.device for t in tensors}) != 1:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return all(t.dtype in _HALF_OR_SINGLE for t in tensors)
    return len({t.dtype for t in tensors}) == 1


def lora_linear(
    base_layer: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float
) -> torch.Tensor:
    """``base_layer(x) + scaling * B A dropout(x)`` for a layer :func:`fusable` accepted.

    ``a`` is A (r x in), ``b`` is B (out x r); ``dropout`` is the probability applied now (0 in eval).
    """
    calls["fused"] += 1
    weight, bias = base_layer.weight, base_layer.bias
    weight_t = weight if _DENSE_FORWARDS[type(base_layer).forward] else weight.t()
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a, b, bias))
    if not wants_grad:  # inference: no graph node
        with torch.no_grad():
            tokens = x.numel() // x.shape[-1]
            if dropout == 0 and tokens * sum(weight_t.shape) > weight_t.numel():
                return _merged_on_the_fly(x, weight_t, bias, a, b, scaling)
            return LoraLinearFunction.forward(None, x, weight_t, bias, a, b, scaling, dropout)
    return LoraLinearFunction.apply(x, weight_t, bias, a, b, scaling, dropout)


def _merged_on_the_fly(x, weight_t, bias, a, b, scaling):
    """Inference over many tokens: ``x (W + s B A)^T + b`` with a transient merged weight.

    The low-rank path reads and writes activations (about ``tokens * (in + out)`` values), forming
    ``W + s B A`` touches the weight (``in * out``); past ``tokens * (in + out) > in * out`` the
    transient merge is the cheaper one, and the layer then costs what a merged layer costs. The
    base weight itself is never written: the adapter stays unmerged.
    """
    dtype = _compute_dtype(x)
    with _no_autocast(x):
        wide = torch.promote_types(weight_t.dtype, a.dtype)  # e.g. a bf16 base under autocast, fp32 adapter
        merged = torch.addmm(weight_t.to(wide), a.t().to(wide), b.t().to(wide), alpha=scaling).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = x2.mm(merged) if bias is None else torch.addmm(bias.to(dtype), x2, merged)
    return out.view(*x.shape[:-1], out.shape[-1])


_NOTHING = contextlib.nullcontext()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    # Entering torch.autocast costs Python time at every layer: only where autocast is actually on.
    return (
        torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else _NOTHING
    )


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x), kept)`` drawn as ``nn.Dropout`` draws it, so that one seed gives one mask on
    either path: on CUDA/XPU its fused kernel (which returns the bool mask itself); elsewhere
    ``bernoulli_(1 - p)`` into a tensor like ``x``, ``div_(1 - p)``, times ``x``."""
    if x.is_cuda or x.is_xpu:
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise.ne(0)


class LoraLinearFunction(torch.autograd.Function):
    """``addmm(bias, x, W^T) + s * (dropout(x) A^T) B^T`` with a frozen ``W``; see the module docstring.

    Under autocast the matmuls run in the autocast dtype, as the general path's would (``nn.Linear`` is
    on autocast's lower-precision list); casts are explicit here and autocast is switched off inside,
    so that the in-place ``addmm_`` sees one dtype. Gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight_t, bias, a, b, scaling, p):  # noqa: D102 (documented on the class)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        # the dropout is applied in x's dtype, before any autocast cast, as nn.Dropout's would be
        xd, mask = _dropout(x2, p) if p > 0 else (x2, None)
        with _no_autocast(x):
            xc, xdc = x2.to(dtype), xd.to(dtype)
            wc, ac, bc = weight_t.to(dtype), a.to(dtype), b.to(dtype)
            out = xc.mm(wc) if bias is None else torch.addmm(bias.to(dtype), xc, wc)
            ax = xdc.mm(ac.t())
            out.addmm_(ax, bc.t(), alpha=scaling)
        if ctx is not None:
            # x once (shared by the base matmul and A, and in memory with every sibling projection that
            # reads the same input), the r-wide A x, and the dropout mask as bool.
            ctx.save_for_backward(xc, ax, weight_t, a, b, mask)
            ctx.scaling, ctx.p, ctx.dtype = scaling, p, dtype
            ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
            ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        xc, ax, weight_t, a, b, mask = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        need_x, _, need_bias, need_a, need_b, _, _ = ctx.needs_input_grad
        with _no_autocast(grad):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            ac, bc = a.to(dtype), b.to(dtype)
            # d/d(A x), r wide: the scaling is applied here, not to g. B is laid out r x out first:
            # with the thin operand transposed the matmul measured 1.4-2.5x faster than g @ B.
            gax = g.mm(bc.t().contiguous().t()).mul_(s)
            noise = None if mask is None else mask.to(ctx.x_dtype).div_(1 - ctx.p)
            gx = ga = gb = gbias = None
            if need_x:
                gx = g.mm(weight_t.to(dtype).t())
                if noise is None:
                    gx.addmm_(gax, ac)
                else:
                    gx = gx.to(ctx.x_dtype).add_(gax.mm(ac).to(ctx.x_dtype).mul_(noise))
                gx = gx.to(ctx.x_dtype).view(ctx.x_shape)
            if need_a:
                xd = xc if noise is None else (xc.to(ctx.x_dtype) * noise).to(dtype)
                ga = gax.t().mm(xd).to(a.dtype)
            if need_b:
                # (A x)^T g, transposed: the orientation autograd uses for a linear weight; g^T (A x)
                # (a long, thin output) measured 7-8x slower
                gb = ax.t().mm(g).t().mul_(s).to(b.dtype)
            if need_bias:
                gbias = g.sum(0).to(ctx.bias_dtype)
        return gx, None, gbias, ga, gb, None, None


def routed_lora(
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
    slots: torch.Tensor,
    x: torch.Tensor,
    base_out: torch.Tensor,
    cache: dict,
) -> torch.Tensor:
    """``base_out`` plus, for each example ``i``, ``s B A x_i`` of adapter ``slots[i]`` (none where
    ``slots[i] == len(adapters)``), from ``(A, B, s)`` triples of any ranks.

    The A matrices are concatenated into one ``(R, in)`` matrix and the scaled B into one ``(out, R)``
    (``R`` the sum of the ranks), so the whole layer is two thin matmuls, as for a single adapter of
    rank ``R``: ``x A_cat^T`` gives every adapter's ``A x`` for every row, a 0/1 mask keeps each
    example's own columns, and ``addmm_`` adds ``masked @ (sB)_cat^T`` into the base output. A thin
    matmul costs about the reading of ``x`` whatever ``R`` is, so this stays near the single-adapter
    cost; masked columns add exact zeros. Past ``R > min(in, out) / 4`` (many adapters) it
    would approach a full matmul, and per-example gathered ``bmm`` takes over instead.
    ``cache`` (kept by the caller between forwards for this set of adapters) holds the concatenation.
    """
    a_cat, b_cat, owner = _concatenated(adapters, cache)
    dtype = a_cat.dtype
    batch, width = x.shape[0], x.shape[-1]
    keep = (slots[:, None] == owner[None, :]).to(dtype)  # (batch, R): 1 on each example's own columns
    x2 = x.reshape(-1, width).to(dtype)
    if a_cat.shape[0] <= min(width, base_out.shape[-1]) // 4:
        low = x2.mm(a_cat.t()).view(batch, -1, a_cat.shape[0]).mul_(keep[:, None, :]).view(-1, a_cat.shape[0])
        if not torch.is_grad_enabled() and base_out.dtype == dtype and base_out.is_contiguous():
            base_out.view(-1, base_out.shape[-1]).addmm_(low, b_cat.t())  # no output-sized temporary
            return base_out
        delta = low.mm(b_cat.t())
    else:  # many adapters: gather each example's own (A, sB) and use batched matmuls
        low = torch.bmm(x2.view(batch, -1, width), (a_cat[None] * keep[:, :, None]).transpose(1, 2))
        delta = torch.bmm(low, b_cat.t()[None].expand(batch, -1, -1))
    delta = delta.view(base_out.shape).to(base_out.dtype)
    if torch.is_grad_enabled():
        return base_out + delta
    return base_out.add_(delta)


def _concatenated(adapters: list[tuple[torch.Tensor, torch.Tensor, float]], cache: dict):
    """(A_cat, (sB)_cat, owner of each column), rebuilt only when an adapter tensor changed."""
    key = tuple((id(a), a._version, id(b), b._version, s) for a, b, s in adapters)
    if cache.get("key") == key and not torch.is_grad_enabled():
        return cache["value"]
    a_cat = torch.cat([a for a, _, _ in adapters])
    b_cat = torch.cat([b * s for _, b, s in adapters], dim=1)
    owner = torch.cat([torch.full((a.shape[0],), i, device=a.device) for i, (a, _, _) in enumerate(adapters)])
    if not torch.is_grad_enabled():
        # the sources are kept with the key: while they live, no new tensor can take their ids
        cache.update(
            key=key, value=(a_cat, b_cat, owner), sources=[t for a, b, _ in adapters for t in (a, b)]
        )
    return a_cat, b_cat, owner


def dora_linear(
    base_layer: nn.Module,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
) -> torch.Tensor:
    """DoRA's ``b + (m / n) * (W x + s B A x)`` for a layer :func:`fusable` accepted, without dropout
    and outside autocast (the caller checks both); ``norm`` is ``||W + s B A||`` per output row, detached.
    """
    calls["fused"] += 1
    weight_t = base_layer.weight if _DENSE_FORWARDS[type(base_layer).forward] else base_layer.weight.t()
    bias = base_layer.bias
    if not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a, b, magnitude, bias))
    ):
        with torch.no_grad():
            return DoraLinearFunction.forward(None, x, weight_t, bias, a, b, scaling, magnitude, norm)
    return DoraLinearFunction.apply(x, weight_t, bias, a, b, scaling, magnitude, norm)


class DoraLinearFunction(torch.autograd.Function):
    """DoRA on a frozen dense weight with the norm detached (DoRA section 4.3).

    The general path computes ``base + (scale - 1) * (base - b) + scale * s * B A x`` with five
    output-sized temporaries and keeps two of them (``base - b`` and ``B A x``) for backward. Here
    ``z = W x + s B A x`` is formed in place in one buffer (as in :class:`LoraLinearFunction`), the
    output is ``b + scale * z``, and ``z`` is the one output-sized tensor kept: the magnitude's gradient
    is ``sum_tokens(grad * z) / n``; the rest of backward is LoRA's with ``grad * scale``.
    """

    @staticmethod
    def forward(ctx, x, weight_t, bias, a, b, scaling, magnitude, norm):  # noqa: D102
        x2 = x.reshape(-1, x.shape[-1])
        z = x2.mm(weight_t)
        ax = x2.mm(a.t())
        z.addmm_(ax, b.t(), alpha=scaling)
        scale = magnitude.reshape(-1) / norm
        out = z * scale if bias is None else torch.addcmul(bias, z, scale)
        if ctx is not None:
            ctx.save_for_backward(x2, ax, z, weight_t, a, b, scale, norm)
            ctx.scaling, ctx.x_shape, ctx.m_shape = scaling, x.shape, magnitude.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x2, ax, z, weight_t, a, b, scale, norm = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_bias, need_a, need_b, _, need_m, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        gm = (g * z).sum(0).div_(norm).view(ctx.m_shape) if need_m else None
        gbias = g.sum(0) if need_bias else None
        gz = g * scale
        gax = gz.mm(b.t().contiguous().t()).mul_(s)  # layouts as in LoraLinearFunction.backward
        gx = ga = gb = None
        if need_x:
            gx = gz.mm(weight_t.t()).addmm_(gax, a).view(ctx.x_shape)
        if need_a:
            ga = gax.t().mm(x2)
        if need_b:
            gb = ax.t().mm(gz).t().mul_(s)
        return gx, None, gbias, ga, gb, None, gm, None
