"""Trainable tokens: train the embedding rows of a few tokens and nothing else of the embedding matrix.

The use case is new tokens: a base model gets chat special tokens (``<|im_start|>``, ``<|im_end|>``)
added to its tokenizer, its embeddings are resized, and only the new rows are trained, instead of the
whole ``vocab x hidden`` matrix (``modules_to_save``) or a low-rank delta over every row (LoRA on the
embedding). The reference library's ``TrainableTokens`` method (``peft_type: "TRAINABLE_TOKENS"``), with
its fields and tensors, and the same adapter inside LoRA as ``LoraConfig.trainable_token_indices``.

How it computes: the adapter holds the *values* of its rows, ``trainable_tokens_delta`` (despite the
reference's name, a replacement, not a difference: ``(len(token_indices), hidden)``, initialised from the
rows it replaces, so a fresh adapter changes nothing). The layer runs its base module with the weight
``W.index_copy(0, token_indices, values)``, which is also exactly what a merge writes; unmerging writes
back the rows as they were when the adapter was created. A replacement rather than a delta keeps loading
well defined after a resize: whatever random values the new rows of the loading model got, the adapter's
rows replace them.

Tied embeddings: when other modules hold the embedding's very weight (``lm_head`` of a model with
``tie_word_embeddings``), each gets a follower adapter sharing the same values, as the reference's
``tied_adapter`` does: a new token's row is both its input vector and its output weight, merged and
unmerged outputs agree, and a merge writes the shared tensor once, consistently (``keeps_ties``).

Interchange (``base_model.model.`` + module path + suffix):

- this method: ``<embedding>.trainable_tokens_delta``, and for a tied follower the same values again under
  ``<output head>.trainable_tokens_delta`` (the reference writes both); config keys ``token_indices``,
  ``target_modules`` (recorded as the input embedding's name when left unset), ``init_weights``;
- inside LoRA: ``<embedding>.token_adapter.trainable_tokens_delta`` per layer named by
  ``trainable_token_indices`` (a list: the input embedding; a dict: layer name -> indices); tied followers
  are not saved (the reference ties them again on load).

``token_indices`` are never saved as tensors: the config carries them, in the order of the rows.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import registry
from ..core.anatomy import user_modules
from ..core.config import ALL_LINEAR, AdapterConfig
from ..core.layer import AdapterModule
from ..core.layer import adapter_dtype as _adapter_dtype
from ..core.registry import register_layer, register_method
from ..core.targeting import Plan, Target
from ..core.tying import shared_weights
from ..errors import ConfigError, NoTargetMatchedError, UnsupportedLayerError

PEFT_TYPE = "TRAINABLE_TOKENS"
DELTA = "trainable_tokens_delta"
# the prefix of the saved tensor when the adapter rides inside another method (LoRA's trainable_token_indices)
INSIDE_LORA = "token_adapter."


@register_method(PEFT_TYPE)
@dataclass
class TrainableTokensConfig(AdapterConfig):
    """Train the rows of ``token_indices`` in an embedding (and in every module tied to it).

    Attributes:
        token_indices: The token ids whose rows are trained, e.g. the ids of tokens just added to the
            tokenizer (``tokenizer.convert_tokens_to_ids([...])``). Distinct, and below the embedding's
            number of rows (resize the model's embeddings to the tokenizer first).
        target_modules: The embedding(s) to train rows of. None: the model's input embedding
            (``get_input_embeddings()``); an output head (``"lm_head"``, an ``nn.Linear`` with one row
            per token) may be named too, for models whose head is not tied to the embedding.
        init_weights: True: start from the rows' current values (the adapter starts as a no-op). False:
            random values (for tests).
    """

    pick_when = "you added tokens (e.g. chat special tokens) and want to train only their embedding rows, alone or beside LoRA"

    # embedding rows move far more per step than LoRA's low-rank factors need to
    lr_candidates: ClassVar[tuple[float, ...]] = (1e-3, 3e-3, 1e-2)
    display_name: ClassVar[str] = "trainable tokens"
    trains_tokens: ClassVar[bool] = True
    fields_not_in_format: ClassVar[tuple[str, ...]] = (
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
    )

    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.token_indices, tuple):
            self.token_indices = list(self.token_indices)
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        # [] is the reference's default, and a run fills it from data.add_special_tokens: refused at inject
        out += index_problems("token_indices", self.token_indices, empty=True)
        if not isinstance(self.init_weights, bool):
            out.append(f"init_weights: must be True or False, got {self.init_weights!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                out.append(f"{name}: trainable tokens have no rank or alpha; leave it empty")
        if self.target_modules == ALL_LINEAR:
            out.append(
                "target_modules: 'all-linear' would train token rows of every linear layer; leave it unset (the "
                "input embedding) or name the embedding and an untied output head, e.g. ['embed_tokens', 'lm_head']"
            )
        return out

    def with_trained_tokens(self, indices: list[int], layers: list[str]) -> TrainableTokensConfig:
        targets = self.target_modules
        if isinstance(targets, list) or (targets is None and len(layers) > 1):
            targets = list(dict.fromkeys([*(targets or []), *layers]))
        return self.replace(
            token_indices=list(dict.fromkeys([*self.token_indices, *indices])), target_modules=targets
        )

    def default_target_spec(self, model: nn.Module) -> list[str] | str | None:
        return [input_embedding_name(model)]

    def after_resolve(self, plan: Plan) -> TrainableTokensConfig:
        if self.target_modules is None:
            # the reference records the embedding it chose by its full name (a string), so both read the
            # file alike; a string is a full-match regex, and a full name matches itself
            chosen = [t.name for t in plan.targets if t.follows is None]
            return self.replace(target_modules=chosen[0] if len(chosen) == 1 else chosen)
        return self

    def layer_values(self, target: Target) -> dict[str, Any]:
        return {"token_indices": list(self.token_indices), "init_weights": bool(self.init_weights)}

    def extra_targets(self, model: nn.Module, plan: Plan) -> list[Target]:
        if not self.token_indices:
            raise ConfigError(
                [
                    "token_indices: empty; list the ids of the tokens whose rows to train (in a run, "
                    "data.add_special_tokens fills it with the ids of the tokens it adds)"
                ],
                what=type(self).__name__,
            )
        # a target holding the same weight as an earlier one (both sides of a tie named) follows it
        first: dict[int, str] = {}
        for target in plan.targets:
            weight = id(target.module._parameters.get("weight"))
            if weight in first:
                target.values, target.follows = {"saved": True}, first[weight]
            else:
                first[weight] = target.name
        sources = [t for t in plan.targets if t.follows is None]
        return followers(model, sources, plan.targets, key_prefix="", saved=True)


def index_problems(name: str, indices: Any, empty: bool = False) -> list[str]:
    """What is wrong with a list of token indices (the reference's ``token_indices``); ``empty`` allows []."""
    if not isinstance(indices, list) or not (indices or empty):
        return [f"{name}: expected a non-empty list of token ids, got {indices!r}"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        return [f"{name}: every token id must be a non-negative integer, got {indices!r}"]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        return [f"{name}: token ids {repeated} are listed more than once; list each once"]
    return []


def input_embedding_name(model: nn.Module) -> str:
    """The full name of ``model.get_input_embeddings()`` (the reference's default target), else
    ``"embed_tokens"``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is not None:
        embedding = getattr(embedding, "base_layer", embedding)  # already adapted by another adapter
        for name, module in user_modules(model):
            if module is embedding:
                return name
    return "embed_tokens"


# -- the adapter -------------------------------------------------------------------------------------


class TrainableTokens(AdapterModule):
    """New values for some rows of an embedding (or of an output head holding one row per token).

    A follower (``follows=`` the adapter on a module holding the same weight) owns no tensor: it reads the
    followed adapter's values, indices and original rows, so both sides of a tie always agree.
    """

    transforms = "parameters"  # the base runs once with the rows replaced, as a merge would leave them
    additive = False  # a replacement: other adapters' changes to the same rows would be overwritten
    keeps_ties = True

    def __init__(
        self,
        base_layer: nn.Module,
        token_indices: list[int] | None = None,
        init_weights: bool = True,
        key_prefix: str = "",
        saved: bool = True,
        follows: TrainableTokens | None = None,
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        if weight.dim() != 2:
            raise UnsupportedLayerError(
                f"trainable tokens need a weight with one row per token, got shape {tuple(weight.shape)}"
            )
        self.key_prefix = key_prefix
        self.saved = saved
        self._follows = [follows] if follows is not None else []  # a list: not registered as a submodule
        if follows is not None:
            if tuple(follows.trainable_tokens_original.shape[1:]) != tuple(weight.shape[1:]):
                raise UnsupportedLayerError(
                    f"shares its weight with an embedding of width {follows.trainable_tokens_original.shape[1]} "
                    f"but holds width {weight.shape[1]}"
                )
            self.token_indices = follows.token_indices
            return
        indices = list(token_indices or [])
        rows = weight.shape[0]
        beyond = [i for i in indices if i >= rows]
        if beyond:
            raise UnsupportedLayerError(
                f"token ids {beyond[:5]} are past its {rows} rows; resize the model's embeddings to the tokenizer "
                "first (model.resize_token_embeddings(len(tokenizer)))"
            )
        self.token_indices = indices
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        with torch.no_grad():
            original = weight.detach().index_select(0, index).clone()
            start = original if init_weights else torch.randn_like(original)
        # a copy in any case: ``.to`` returns the tensor itself when the dtype already fits
        self.trainable_tokens_delta = nn.Parameter(start.to(_adapter_dtype(weight), copy=True))
        # the rows as they were, written back by unmerge (the reference's trainable_tokens_original)
        self.register_buffer("trainable_tokens_original", original, persistent=False)
        self.register_buffer("index", index, persistent=False)

    @property
    def source(self) -> TrainableTokens:
        """The adapter holding the tensors: the followed one, or this one."""
        return self._follows[0] if self._follows else self

    def _rows(self, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        index = self.source.index.to(weight.device)
        return weight.index_copy(0, index, values.to(device=weight.device, dtype=weight.dtype))

    def merged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": self._rows(tensors["weight"], self.source.trainable_tokens_delta)}

    def unmerged_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": self._rows(tensors["weight"], self.source.trainable_tokens_original)}

    def fused_output(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        # alone on the layer: the rows replaced in the base's own dtype (no float32 copy of the whole
        # table); the same values a merge writes, since a replacement needs no arithmetic
        weight = self._rows(base_layer.weight, self.source.trainable_tokens_delta)
        return torch.func.functional_call(base_layer, {"weight": weight}, (x,))

    def interchange_state(self, portable: bool = False) -> dict[str, torch.Tensor]:
        if not self.saved:
            return {}
        return {self.key_prefix + DELTA: self.source.trainable_tokens_delta}


def _check(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "trainable tokens need a 2-D weight with one row per token"
    return None


register_layer(PEFT_TYPE, "Embedding", (nn.Embedding,), TrainableTokens, check=_check)
# an output head with one row per token (lm_head), for models whose head is not tied to the embedding
register_layer(PEFT_TYPE, "Linear (output head)", (nn.Linear,), TrainableTokens, check=_check)


# -- targets for trainable tokens inside another method (LoRA's trainable_token_indices) ----------------


def token_targets(
    model: nn.Module, spec: list[int] | dict[str, list[int]], plan: Plan, key_prefix: str = INSIDE_LORA
) -> list[Target]:
    """Targets training ``spec``'s rows: a list means the input embedding's rows; a dict maps layer names
    (matched by name suffix, as the reference matches them) to their rows. Modules tied to a target get
    followers (not saved, as in the reference). A tied pair named twice must list the same rows."""
    layers = spec if isinstance(spec, dict) else {input_embedding_name(model): spec}
    modules = [(n, m) for n, m in user_modules(model) if n]
    sources: list[Target] = []
    held: dict[int, tuple[str, list[int]]] = {}  # id(weight) -> the target training it, and its rows
    for key, indices in layers.items():
        hits = [(n, m) for n, m in modules if n.endswith(key)]
        if not hits:
            close = difflib.get_close_matches(key, [n.rsplit(".", 1)[-1] for n, _ in modules], n=3)
            raise NoTargetMatchedError(
                f"trainable_token_indices: layer {key!r} matched 0 modules; closest: "
                f"{', '.join(repr(c) for c in close) or 'none similar'}"
            )
        for name, module in hits:
            row, reason = registry.dispatch(PEFT_TYPE, module)
            if row is None:
                raise UnsupportedLayerError(
                    f"trainable_token_indices: {name!r} ({type(module).__name__}) cannot train token rows: {reason}"
                )
            weight = module._parameters.get("weight")
            if id(weight) in held:
                other, rows = held[id(weight)]
                if list(rows) != list(indices):
                    raise UnsupportedLayerError(
                        f"trainable_token_indices: {other!r} and {name!r} hold one weight (tied embeddings) but are "
                        f"given different token ids ({rows} vs {indices}); give both the same ids, or name only "
                        "the input embedding (its tied head follows it)"
                    )
                continue  # the tied partner follows the first one
            held[id(weight)] = (name, list(indices))
            values = {"token_indices": list(indices), "init_weights": True, "key_prefix": key_prefix}
            sources.append(Target(name, module, row, values=values))
    return sources + followers(model, sources, plan.targets + sources, key_prefix=key_prefix, saved=False)


def followers(
    model: nn.Module, sources: list[Target], taken: list[Target], key_prefix: str, saved: bool
) -> list[Target]:
    """A follower target for every module (not in ``taken``) holding the weight of one of ``sources``."""
    shared = shared_weights(model)
    if not shared:
        return []
    modules = dict(user_modules(model))
    names = {t.name for t in taken}
    out = []
    for source in sources:
        weight = source.module._parameters.get("weight")
        for holder in shared.get(id(weight), []):
            owner, _, pname = holder.rpartition(".")
            if owner in names or pname != "weight" or owner not in modules:
                continue
            module = modules[owner]
            row, reason = registry.dispatch(PEFT_TYPE, module)
            if row is None:
                raise UnsupportedLayerError(
                    f"{owner!r} ({type(module).__name__}) holds the weight of {source.name!r} (tied), so trainable "
                    f"tokens must change it too, but cannot: {reason}. Untie the two before adapting."
                )
            values = {"key_prefix": key_prefix, "saved": saved}
            out.append(Target(owner, module, row, values=values, follows=source.name))
            names.add(owner)
    return out


__all__ = ["TrainableTokensConfig", "TrainableTokens", "token_targets", "input_embedding_name"]
