"""Mixture-of-experts models for tests: tiny transformers 5 models built from configs (Qwen3-MoE, Mixtral,
OLMoE: experts fused as 3-D parameters, a TopKRouter holding the router weight), and a plain-torch block of
the same kind for the contract matrix (with the transposed layout of gpt-oss as an option)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
# The shapes of issue 21's measured case: hidden 32, 4 experts of inner width 16, so gate_up_proj is
# (4, 32, 32) and down_proj (4, 32, 16).
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}


def tiny_transformers_moe(arch: str, seed: int = 0) -> nn.Module:
    """A tiny ``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM`` / ``OlmoeForCausalLM`` in eval mode, with the
    router's weight random (Qwen3-MoE starts it at zero, which would route every token alike)."""
    import transformers

    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **TINY,
            moe_intermediate_size=16,
            intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    elif arch == "mixtral":
        config = transformers.MixtralConfig(
            **TINY, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2
        )
        model = transformers.MixtralForCausalLM(config)
    elif arch == "olmoe":
        config = transformers.OlmoeConfig(**TINY, intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        model = transformers.OlmoeForCausalLM(config)
    elif (
        arch == "gpt_oss"
    ):  # stacks stored (experts, in, out): is_transposed; per-expert biases; router "router"
        config = transformers.GptOssConfig(
            **TINY,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["full_attention"] * TINY["num_hidden_layers"],
        )
        model = transformers.GptOssForCausalLM(config)
        with torch.no_grad():  # its init leaves experts, biases and router at zero
            for param in model.parameters():
                param.normal_(0.0, 0.2)
        return model.eval()
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model.eval()


ARCHS = ["qwen3_moe", "mixtral", "olmoe"]


def batch(seed: int = 1, size: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (size, length), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class StackedExperts(nn.Module):
    """Experts as one 3-D parameter per projection, as transformers 5 holds them: ``gate_up_proj``
    (experts, 2 * inner, hidden) and ``down_proj`` (experts, hidden, inner), or (experts, in, out) each when
    ``is_transposed`` (gpt-oss). Each token goes through the experts it was routed to."""

    def __init__(self, experts: int, hidden: int, inner: int, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        gate_up, down = (hidden, 2 * inner), (inner, hidden)
        if not transposed:
            gate_up, down = gate_up[::-1], down[::-1]
        self.gate_up_proj = nn.Parameter(torch.randn(experts, *gate_up) * 0.4)
        self.down_proj = nn.Parameter(torch.randn(experts, *down) * 0.4)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.is_transposed else F.linear(x, weight)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for slot in range(index.shape[1]):
            for expert in range(self.gate_up_proj.shape[0]):
                rows = (index[:, slot] == expert).nonzero().squeeze(1)
                if rows.numel():
                    gate, up = self._linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
                    h = self._linear(F.silu(gate) * up, self.down_proj[expert])
                    out = out.index_add(0, rows, h * weights[rows, slot, None])
        return out


class Router(nn.Module):
    """Top-k routing by a (experts, hidden) weight, as transformers 5's TopKRouter (not a linear layer)."""

    def __init__(self, experts: int, hidden: int, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        return index, weights / weights.sum(dim=-1, keepdim=True)


class MoEBlock(nn.Module):
    """An input projection (a plain linear layer) and a routed mixture of stacked experts."""

    def __init__(self, experts: int = 3, hidden: int = 6, inner: int = 4, transposed: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.gate = Router(experts, hidden)
        self.experts = StackedExperts(experts, hidden, inner, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        index, weights = self.gate(x)
        return x + self.experts(x, index, weights)
