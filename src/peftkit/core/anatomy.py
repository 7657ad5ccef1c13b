"""Where a transformer's attention, feed-forward and norm layers are, found from its structure.

Methods adapt layers by role ("the attention query and value projections", "the MLP's down projection");
a role table per ``model_type`` only covers the architectures someone wrote down. :func:`find` reads the
roles off any transformer instead, from evidence every architecture shares, whatever its names:

1. **Blocks**: the children of a ``ModuleList`` (or ``Sequential``) that are all of one class and hold
   linear layers (``encoder.layer.N``, ``model.layers.N``, ``h.N``; T5's ``encoder.block.N`` and
   ``decoder.block.N``). Lists inside a block (T5's sublayers, MoE experts) are part of the block.
2. **Hidden width** ``H`` of each stack: the config's ``hidden_size`` (``d_model``, ``n_embd`` by
   transformers' aliases) when a layer of the blocks reads or writes it, else the commonest norm width,
   else the commonest linear width (plain ``nn.Module`` models have no config).
3. **Units** of a block, in registration order: each child holding weights (descending while a single
   child holds them all, as T5's ``layer`` list does), where a child that never writes ``H`` (BERT's
   ``intermediate``, BART's ``fc1``) joins the one after it.
4. **Feed-forward**: the last unit (every transformer block registers its attention first), when shapes
   agree: a down projection reads a width that one or two up projections write (twice that width for
   a fused gate-and-up, as Phi-3's ``gate_up_proj``) and writes ``H``. A unit with no linear layer but
   stacked expert weights is a mixture-of-experts block (Mixtral in transformers 5).
5. **Attention**: every earlier unit with projections reading ``H`` and one writing it. The output
   projection is the writer reading a width other than ``H``; when all are ``H x H`` it is the one
   under its own parent (BERT's ``attention.output.dense``), then one named like an output, then the
   last registered. The remaining readers are query, key and value: one fused projection (GPT-2
   ``c_attn``, Bloom ``query_key_value``), or three, where the odd width is the query (grouped-query
   attention) and names, then registration order, tell the rest apart (OPT registers ``k_proj``,
   ``v_proj``, ``q_proj``). A second attention in a block is cross-attention.
6. **Norms**: ``nn.LayerNorm``, ``nn.RMSNorm`` or a class named ``...LayerNorm`` / ``...RMSNorm``
   with a weight, as wide as a stack's ``H`` (per-head query/key norms are left out).

:func:`target_spec` turns modules into a ``target_modules`` value the reference library reads the same
way: name suffixes when some suffix selects exactly the modules, else one full-match regular expression.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .layer import AdapterLayer, ModelParts, ModulesToSave

try:  # GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    HFConv1D = ()

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((HFConv1D,) if HFConv1D else ())

ROLES = {
    "query": "attention query",
    "key": "attention key",
    "value": "attention value",
    "attention_output": "attention output",
    "self_attention_output": "self-attention output",
    "mlp_up": "MLP up",
    "mlp_gate": "MLP gate",
    "mlp_down": "MLP down",
    "mlp": "MLP block",
    "mlp_output": "MLP output",
    "norm": "norm layers",
}
"""Role -> how reports name it. ``query``, ``key`` and ``value`` name the fused projection where there is
one; ``mlp_up`` includes gates; ``mlp_output`` is the MLP down, or a mixture-of-experts block that has
none; ``mlp`` is the module holding the whole feed-forward computation, when there is one."""

_OUTPUT_WORDS = {"o", "out", "output", "dense", "wo"}
_QKV_WORDS = ({"q", "query", "wq"}, {"k", "key", "wk"}, {"v", "value", "wv"})
_GATE_WORDS = {"gate", "w1", "wi0"}
_CONFIG_WIDTHS = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim")


def user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the user sees them: an adapted layer stands for the base layer it wraps."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            yield name, module.base_layer
            continue
        if isinstance(module, ModelParts):  # adapter state, not part of the user's model
            continue
        yield name, module
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's own, or a model family's ``...LayerNorm`` / ``...RMSNorm`` class."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return any(c.__name__.endswith(("RMSNorm", "LayerNorm")) for c in type(module).__mro__)


def linear_widths(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


@dataclass
class Attention:
    """One attention of a block. ``query``, ``key`` and ``value`` are one name when they are fused."""

    name: str
    cross: bool = False
    query: str | None = None
    key: str | None = None
    value: str | None = None
    output: str | None = None
    note: str = ""  # why some projection has no name (nn.MultiheadAttention)

    @property
    def fused(self) -> bool:
        return self.query is not None and self.query == self.value


@dataclass
class FeedForward:
    """The feed-forward part of a block: up (and gate) projections, down projections, its module."""

    name: str | None  # the module holding the whole computation, None when its layers sit in the block
    up: list[str] = field(default_factory=list)
    gate: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)

    @property
    def experts(self) -> bool:
        """A mixture of experts whose experts are stacked weights, not layers."""
        return not self.down


@dataclass
class Block:
    name: str
    attention: list[Attention] = field(default_factory=list)
    mlp: FeedForward | None = None


@dataclass
class Anatomy:
    """What :func:`find` read off a model: its stacks of blocks, their roles, its norms, and notes on
    whatever it could not place."""

    stacks: dict[str, int] = field(default_factory=dict)  # ModuleList name -> hidden width
    blocks: list[Block] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    # what could not be placed -> the roles it concerns (none: all of them)
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def why_missing(self, roles: Iterable[str]) -> list[str]:
        """The notes explaining why ``roles`` have fewer modules than a reader would expect."""
        wanted = set(roles)
        return [note for note, about in self.notes.items() if not about or wanted & set(about)]

    def modules(self, role: str) -> list[str]:
        """Names of the modules in ``role`` (one of :data:`ROLES`), in model order, each once."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if role == "norm":
            return list(self.norms)
        out: list[str | None] = []
        for block in self.blocks:
            for attn in block.attention:
                if role in ("query", "key", "value"):
                    out.append(getattr(attn, role))
                elif role == "attention_output" or (role == "self_attention_output" and not attn.cross):
                    out.append(attn.output)
            mlp = block.mlp
            if mlp is not None:
                picks = {
                    "mlp_up": mlp.up,
                    "mlp_gate": mlp.gate,
                    "mlp_down": mlp.down,
                    "mlp": [mlp.name],
                    "mlp_output": mlp.down or [mlp.name],
                }
                out.extend(picks.get(role, []))
        return list(dict.fromkeys(n for n in out if n))

    def summary(self) -> list[str]:
        """A few lines saying what was found, each role by its pattern over the blocks."""
        if not self.blocks:
            return ["no repeated blocks found"]
        lines = [
            f"{len([b for b in self.blocks if b.name.startswith(s + '.')])} blocks in {s}.N, hidden {h}"
            for s, h in self.stacks.items()
        ]
        same_as = {"self_attention_output": "attention_output", "mlp_output": "mlp_down"}
        for role in ROLES:
            found = self.modules(role)
            if found and not (role in same_as and found == self.modules(same_as[role])):
                lines.append(f"{ROLES[role]}: " + ", ".join(dict.fromkeys(_pattern(n) for n in found)))
        return lines + [f"note: {n}" for n in self.notes]


def _pattern(name: str) -> str:
    """The name with its block number as N: ``decoder.block.N.layer.1.EncDecAttention.q``."""
    parts = name.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join("N" if i == first else p for i, p in enumerate(parts))


# -- the finder ------------------------------------------------------------------------------------


@dataclass
class _Linear:
    name: str
    d_in: int
    d_out: int

    @property
    def parent(self) -> str:
        return self.name.rpartition(".")[0]


class _Tree:
    """The model's modules by name, with children in registration order."""

    def __init__(self, named: Iterable[tuple[str, nn.Module]]) -> None:
        self.modules: dict[str, nn.Module] = dict(named)
        self.children: dict[str, list[str]] = {n: [] for n in self.modules}
        for name in self.modules:
            if name:
                self.children.setdefault(name.rpartition(".")[0], []).append(name)

    def below(self, name: str) -> Iterator[str]:
        """``name`` and every module under it, in registration order."""
        yield name
        for child in self.children.get(name, []):
            yield from self.below(child)

    def linears(self, name: str) -> list[_Linear]:
        return [
            _Linear(n, *linear_widths(self.modules[n]))
            for n in self.below(name)
            if isinstance(self.modules[n], LINEAR_TYPES)
        ]

    def holds_weights(self, name: str) -> bool:
        """Holds a linear layer or a matrix (a norm, dropout or activation does not)."""
        layers = (*LINEAR_TYPES, nn.MultiheadAttention)
        return any(isinstance(self.modules[n], layers) for n in self.below(name)) or any(
            p.dim() >= 2 for p in self.modules[name].parameters()
        )

    def attention_module(self, names: Sequence[str]) -> str | None:
        for root in names:
            for n in self.below(root):
                if isinstance(self.modules[n], nn.MultiheadAttention):
                    return n
        return None


def find(model: nn.Module) -> Anatomy:
    """The roles of ``model``'s layers, found by structure (see the module docstring for the rules)."""
    tree = _Tree(user_modules(model))
    anatomy = Anatomy()
    config = getattr(model, "config", None)
    ffn_widths = _config_ffn_widths(config)
    for stack in _stacks(tree):
        blocks = tree.children[stack]
        width = _hidden_width(tree, blocks, config)
        if width is None:
            continue
        anatomy.stacks[stack] = width
        for block in blocks:
            anatomy.blocks.append(_read_block(tree, block, width, ffn_widths, anatomy.notes))
    widths = set(anatomy.stacks.values())
    anatomy.norms = [
        n for n, m in tree.modules.items() if n and is_norm(m) and _has_weight(m) and _norm_width(m) in widths
    ]
    if not anatomy.stacks:
        anatomy.notes["no repeated blocks (a ModuleList of modules of one class holding linear layers)"] = ()
    return anatomy


def _stacks(tree: _Tree) -> list[str]:
    """Lists of same-class blocks holding linear layers, outermost first; nothing inside a block counts."""
    found: list[str] = []
    for name, module in tree.modules.items():
        if any(name.startswith(s + ".") for s in found):
            continue
        kids = tree.children.get(name, [])
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        if len(kids) < (1 if isinstance(module, nn.ModuleList) else 2):  # a Sequential of one is a wrapper
            continue
        if len({type(tree.modules[k]) for k in kids}) == 1 and all(
            len(tree.linears(k)) >= 2 or tree.attention_module([k]) for k in kids
        ):
            found.append(name)
    return found


def _hidden_width(tree: _Tree, blocks: list[str], config: Any) -> int | None:
    """The width the blocks pass between them: the config's, if the blocks' layers use it, else inferred."""
    linears = [lin for b in blocks for lin in tree.linears(b)]
    seen = Counter(w for lin in linears for w in (lin.d_in, lin.d_out))
    configs = [config]
    try:  # a multimodal config keeps the language model's width in its text config
        configs.append(config.get_text_config())
    except (AttributeError, ValueError):
        pass
    for cfg in configs:
        for key in _CONFIG_WIDTHS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value in seen:
                return value
    norms = Counter(
        _norm_width(tree.modules[n]) for b in blocks for n in tree.below(b) if is_norm(tree.modules[n])
    )
    norms.pop(None, None)
    if norms:
        return norms.most_common(1)[0][0]
    return seen.most_common(1)[0][0] if seen else None


def _config_ffn_widths(config: Any) -> set[int]:
    """Feed-forward widths the config states (intermediate_size, d_ff, ffn_dim ...); empty when none."""
    if config is None:
        return set()
    items = config.to_dict().items() if hasattr(config, "to_dict") else vars(config).items()
    return {
        v
        for k, v in items
        if isinstance(v, int) and not isinstance(v, bool) and re.search(r"intermediate|ffn|d_ff|inner", k)
    }


def _norm_width(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, nn.Parameter) and weight.dim() == 1 else None


def _has_weight(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("weight"), nn.Parameter)


def _units(tree: _Tree, block: str, width: int) -> list[list[str]]:
    """The block's parts holding weights, in order; a part that never writes ``width`` joins the next."""
    node = block
    while True:
        parts = [c for c in tree.children.get(node, []) if tree.holds_weights(c)]
        only = parts[0] if len(parts) == 1 else None
        if only is None or isinstance(tree.modules[only], (*LINEAR_TYPES, nn.MultiheadAttention)):
            break
        node = only
    units: list[list[str]] = []
    pending: list[str] = []
    for part in parts:
        pending.append(part)
        linears = [lin for p in pending for lin in tree.linears(p)]
        writes = any(lin.d_out == width for lin in linears) or not linears or tree.attention_module(pending)
        if writes:
            units.append(pending)
            pending = []
    if pending:
        units.append(pending)
    return units


def _read_block(
    tree: _Tree, block: str, width: int, ffn_widths: set[int], notes: dict[str, tuple[str, ...]]
) -> Block:
    out = Block(block)
    units = _units(tree, block, width)
    if not units:
        return out
    mlp = _feed_forward(tree, block, units[-1], width, ffn_widths)
    if mlp is not None:
        out.mlp, units = mlp, units[:-1]
        if mlp.name is None:
            layers = ", ".join(n.rsplit(".", 1)[-1] for n in mlp.up + mlp.down)
            notes[
                f"the feed-forward layers of {_pattern(block)} ({layers}) sit in the block itself: no module "
                "of its own holds the whole feed-forward computation"
            ] = ("mlp",)
    for unit in units:
        attn = _attention(tree, unit, width)
        if attn is None:
            continue
        attn.cross = bool(out.attention)  # a block's second attention reads the encoder's states
        out.attention.append(attn)
        if attn.note:
            notes[attn.note] = ("query", "key", "value", "attention_output", "self_attention_output")
    return out


def _feed_forward(
    tree: _Tree, block: str, unit: list[str], width: int, ffn_widths: set[int]
) -> FeedForward | None:
    linears = [lin for part in unit for lin in tree.linears(part)]
    if tree.attention_module(unit):
        return None
    if not linears:  # stacked expert weights (a 3-D tensor per projection) and a router
        if len(unit) == 1 and any(p.dim() >= 3 for p in tree.modules[unit[0]].parameters()):
            return FeedForward(unit[0])
        return None
    downs = [lin for lin in linears if lin.d_out == width and lin.d_in != width]
    if ffn_widths and any(d.d_in in ffn_widths for d in downs):
        downs = [d for d in downs if d.d_in in ffn_widths]
    if not downs:
        return None
    inner = Counter(d.d_in for d in downs).most_common(1)[0][0]
    downs = [d for d in downs if d.d_in == inner]
    ups = [lin for lin in linears if lin.d_in == width and lin.d_out in (inner, 2 * inner)]
    by_parent = Counter(u.parent for u in ups)
    if not ups or by_parent.most_common(1)[0][1] > 2:  # three projections under one parent: q, k, v
        return None
    gates = _gates([u for u in ups if u.d_out == inner])
    names = [lin.name for lin in ups + downs]
    home = _common_parent(names)
    if home == block or not home.startswith(block + "."):
        home = downs[0].parent if downs[0].parent != block else None
    return FeedForward(home, [u.name for u in ups], gates, [d.name for d in downs])


def _gates(ups: list[_Linear]) -> list[str]:
    """In a gated MLP, per parent, the one of the two equal up projections that is the gate: named so,
    else the first registered (Llama's gate_proj, T5's wi_0)."""
    gates = []
    for parent in dict.fromkeys(u.parent for u in ups):
        pair = [u for u in ups if u.parent == parent]
        if len(pair) != 2:
            continue
        named = [u for u in pair if _words(u.name) & _GATE_WORDS]
        gates.append((named[0] if len(named) == 1 else pair[0]).name)
    return gates


def _attention(tree: _Tree, unit: list[str], width: int) -> Attention | None:
    home = _common_parent([n for part in unit for n in tree.below(part)])
    mha = tree.attention_module(unit)
    if mha is not None:
        return Attention(
            mha,
            note=(
                f"{_pattern(mha)} is nn.MultiheadAttention: its query, key and value projections are one "
                "parameter (in_proj_weight) and it reads out_proj's weight without calling it, so no projection "
                "of it can be adapted alone (a method adapting the whole module takes it when target_modules "
                "names it, docs/targets.md)"
            ),
        )
    linears = [lin for part in unit for lin in tree.linears(part)]
    writers = [lin for lin in linears if lin.d_out == width]
    if not writers:
        return None
    wide = [w for w in writers if w.d_in != width]
    output = wide[-1] if wide else _output_among(writers, linears)
    projections = [lin for lin in linears if lin.d_in == width and lin is not output]
    attn = Attention(home, output=output.name)
    if len(projections) == 1:
        attn.query = attn.key = attn.value = projections[0].name
    elif len(projections) == 2:  # a query beside a fused key-value projection
        query = [p for p in projections if p.d_out == output.d_in]
        if len(query) != 1:
            return None
        kv = next(p for p in projections if p is not query[0])
        attn.query, attn.key, attn.value = query[0].name, kv.name, kv.name
    elif len(projections) >= 3:
        attn.query, attn.key, attn.value = (p.name for p in _query_key_value(projections))
    else:
        return None
    return attn


def _output_among(writers: list[_Linear], linears: list[_Linear]) -> _Linear:
    """The output projection when every candidate is ``H x H``: under a parent of its own, else named
    like an output, else the last registered."""
    parents = Counter(lin.parent for lin in linears)
    alone = [w for w in writers if parents[w.parent] == 1 and len(linears) > 2]
    if len(alone) == 1:
        return alone[0]
    named = [w for w in writers if _words(w.name) & _OUTPUT_WORDS]
    return named[0] if len(named) == 1 else writers[-1]


def _query_key_value(projections: list[_Linear]) -> tuple[_Linear, _Linear, _Linear]:
    """Query, key and value among three or more projections reading ``H``."""
    by_name = [next((p for p in projections if _words(p.name) & words), None) for words in _QKV_WORDS]
    if len(projections) > 3 and all(by_name) and len({id(p) for p in by_name}) == 3:
        projections = [p for p in projections if p in by_name]
    projections = projections[:3]
    widths = Counter(p.d_out for p in projections)
    odd = [p for p in projections if widths[p.d_out] == 1] if len(widths) == 2 else []
    query = odd[0] if odd else None  # grouped-query attention: keys and values are narrower
    named = [next((p for p in projections if _words(p.name) & words), None) for words in _QKV_WORDS]
    if all(named) and len({id(p) for p in named}) == 3 and (query is None or named[0] is query):
        return named[0], named[1], named[2]
    if query is not None:
        rest = [p for p in projections if p is not query]
        return query, rest[0], rest[1]
    return projections[0], projections[1], projections[2]


def _words(name: str) -> set[str]:
    last = name.rsplit(".", 1)[-1].lower()
    return {w for w in re.split(r"[^a-z0-9]+|_", last) if w} | {last.replace("_", "")}


def _common_parent(names: Sequence[str]) -> str:
    split = [n.split(".") for n in names]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(names) == 1:
        common = split[0][:-1]
    return ".".join(common)


# -- from modules to a target_modules value --------------------------------------------------------


def target_spec(
    names: Sequence[str], groups: Sequence[Sequence[str]]
) -> tuple[list[str] | str, list[list[str] | str]]:
    """A ``target_modules`` value selecting exactly the modules in ``groups``, and the part of it that
    selects each group.

    ``names`` are all module names of the model. Each group gets the shortest name suffixes that select
    only its own modules (``["query", "value"]``); when some module has no such suffix without a layer
    number (BERT's MLP ``output.dense`` is also the end of ``attention.output.dense``) the whole value is
    one regular expression for a full match, with ``\\d+`` for layer numbers.
    """
    index: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            index.setdefault(".".join(parts[-k:]), set()).add(name)
    suffixes = [_suffixes(group, index) for group in groups]
    if all(s is not None for s in suffixes):
        parts_list: list[list[str] | str] = [list(s) for s in suffixes if s is not None]
        return list(dict.fromkeys(e for s in parts_list for e in s)), parts_list
    patterns = [_patterns(group, names) for group in groups]
    whole = _regex([p for ps in patterns for p in ps])
    wanted = {n for g in groups for n in g}
    if {n for n in names if re.fullmatch(whole, n)} != wanted:  # cannot happen by construction; stay exact
        exact = [re.escape(n) for n in wanted]
        return "|".join(sorted(exact)), ["|".join(sorted(re.escape(n) for n in g)) for g in groups]
    return whole, [_regex(ps) for ps in patterns]


def _suffixes(group: Sequence[str], index: dict[str, set[str]]) -> list[str] | None:
    wanted, out = set(group), []
    for name in group:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            if parts[-k].isdigit():  # a layer number: no suffix without one names every layer
                return None
            suffix = ".".join(parts[-k:])
            if index[suffix] <= wanted:
                out.append(suffix)
                break
        else:
            return None
    return list(dict.fromkeys(out))


def _patterns(group: Sequence[str], names: Sequence[str]) -> list[str]:
    wanted, out, exact = set(group), [], {}
    for name in group:
        parts = [r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")]
        for k in range(1, len(parts) + 1):
            tail = r"\.".join(parts[-k:])
            if tail not in exact:  # the same tail comes back for every layer: test it once
                exact[tail] = {n for n in names if re.fullmatch(_regex([tail]), n)} <= wanted
            if exact[tail]:
                out.append(tail)
                break
    return list(dict.fromkeys(out))


def _regex(tails: Sequence[str]) -> str:
    return r"(.*\.)?(" + "|".join(tails) + ")" if tails else r"(?!)"


__all__ = [
    "Anatomy",
    "Attention",
    "Block",
    "FeedForward",
    "ROLES",
    "find",
    "is_norm",
    "linear_widths",
    "target_spec",
    "user_modules",
    "LINEAR_TYPES",
    "HFConv1D",
]
