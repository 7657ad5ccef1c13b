"""vLLM's rules for LoRA adapters, one function per part of the adapter (docs/vllm.md lists each rule,
its level, its fix and the vLLM source it comes from); :func:`peftkit.serve.vllm.check_vllm` applies them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors import SafetensorError, safe_open

from ..core import registry
from ..core.io import PICKLE_NAMES, WEIGHTS_NAME
from ..errors import AdapterFileError

if TYPE_CHECKING:
    from .vllm import VllmReport

# vllm/config/lora.py: MaxLoRARanks. 1 was added late (older releases start at 8), so the command we
# print never passes 1: 8 works in every release and costs no more than a rank-8 buffer.
MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
# vllm/lora/peft_helper.py: the fields PEFTHelper.from_dict requires.
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
# init_lora_weights strings vLLM accepts (PEFTHelper._init_is_supported): inits that only set the first
# adapter weights. Any other (PiSSA, OLoRA, CorDA, LoftQ) rewrote the base weights, which vLLM serves unchanged.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Heads vLLM's newest releases accept in modules_to_save, for classification models only.
CLASSIFIER_HEADS = ("classifier", "score")
PREFIX = "base_model.model."

Level = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Finding:
    """One result of the check: what vLLM would do, and the change that makes the adapter servable.

    ``level``: ``error`` (vLLM refuses the adapter, or would serve it with wrong outputs), ``warning``
    (it depends on the vLLM version or the model: check before relying on it) or ``note`` (a fact about
    how vLLM will serve it). ``check`` names the rule (``method``, ``dora``, ``bias``, ``rank`` ...).
    """

    level: Level
    check: str
    problem: str
    fix: str = ""


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header (the data is never read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterFileError(
            f"cannot read {path}: {exc}. The file is truncated or corrupt; save the adapter again."
        ) from None


def merge_hint(run_dir: Path | None) -> str:
    if run_dir is not None:
        return f"fold it into the base with `peftkit merge {run_dir} OUT_DIR` and serve that (`vllm serve OUT_DIR`)"
    return (
        "fold it into the base (`peftkit merge RUN_DIR OUT_DIR` with the run that trained it, or the reference "
        "library's merge_and_unload) and serve that (`vllm serve OUT_DIR`)"
    )


def method_finding(peft_type: str, directory: Path, merge: str) -> Finding:
    problem = (
        f"the adapter is {peft_type}, and vLLM serves LoRA only: it reads r, lora_alpha and target_modules "
        "from adapter_config.json and refuses any tensor that is not lora_A / lora_B"
    )
    try:
        wraps_layers = registry.config_class(peft_type).wraps_layers
    except KeyError:
        wraps_layers = True  # a method peftkit does not know: say what is possible in general
    if not wraps_layers:  # soft prompts change the input, not a weight: no LoRA can express them
        return Finding(
            "error",
            "method",
            problem + " (soft prompts are neither LoRA nor mergeable into weights)",
            "serve it with peftkit in a process of its own (`peftkit predict`, or the model loaded with "
            "peftkit.load_adapter), or train a LoRA for vLLM",
        )
    return Finding(
        "error",
        "method",
        problem,
        f"write it as a plain LoRA with {_convert_hint(directory)} (LoHa, LoKr, VeRA, AdaLoRA, IA3, OFT, linear "
        f"bottlenecks) and check OUT; or {merge}",
    )


def _convert_hint(directory: Path) -> str:
    # the exact delta of these methods is often of full rank: a rank vLLM takes must be asked for
    return (
        f"`peftkit convert {directory} --to lora --rank R --out OUT` (R at most 512, the largest "
        "--max-lora-rank; OUT/combine_report.json gives each module's error; docs/combine.md)"
    )


def config_findings(config: dict[str, Any], directory: Path, merge: str) -> list[Finding]:
    """The fields vLLM needs, and the features its PEFTHelper refuses: DoRA, biases, modules_to_save."""
    out: list[Finding] = []
    missing = [key for key in REQUIRED_FIELDS if key not in config]
    if missing:
        out.append(
            Finding(
                "error",
                "config",
                f"adapter_config.json lacks {', '.join(missing)}; vLLM refuses it (Missing required "
                "configuration fields)",
                "save the adapter again with save_adapter or save_pretrained, which write every field",
            )
        )
    convert = _convert_hint(directory)
    if config.get("use_dora"):
        out.append(
            Finding(
                "error",
                "dora",
                "the adapter is DoRA (use_dora: true); vLLM does not support DoRA and refuses it",
                f"write it as a plain LoRA with {convert}, or {merge}",
            )
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        out.append(
            Finding(
                "error",
                "bias",
                f'bias: "{bias}" trains base-layer biases, and vLLM refuses adapters with bias other than "none" '
                "(until vLLM dropped LoRA bias in October 2025, PR #25807, it needed --enable-lora-bias)",
                f'retrain with bias: "none"; or, biases included, {merge}',
            )
        )
    if config.get("lora_bias"):
        out.append(
            Finding(
                "error",
                "lora_bias",
                "lora_bias: true gives lora_B a bias, which vLLM does not load (unsupported LoRA weight)",
                f"{merge}; or retrain without lora_bias",
            )
        )
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if saved:
        heads = set(saved) <= set(CLASSIFIER_HEADS)
        out.append(
            Finding(
                "warning" if heads else "error",
                "modules_to_save",
                f"modules_to_save {saved}: whole trained copies of modules, which vLLM does not load"
                + (
                    ' (only its newest releases take ["classifier", "score"], for classification models)'
                    if heads
                    else ""
                ),
                f"with the copies, {merge}; or retrain with the module as a LoRA "
                "target instead of a saved copy (vLLM serves LoRA on lm_head and embed_tokens where the model "
                "declares them, e.g. Llama, Mistral, Qwen2)",
            )
        )
    return out


def unsupported_findings(config: dict[str, Any], merge: str) -> list[Finding]:
    """Features that change what the adapter computes and that vLLM does not implement, and notes."""
    out: list[Finding] = []
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        out.append(
            Finding(
                "error",
                "init",
                f"init_lora_weights: {init!r} rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ), and vLLM serves "
                "the unchanged base: recent vLLM refuses it, older releases serve wrong outputs",
                "save it in portable form: peftkit.save_adapter(model, DIR, portable=True) (the reference library: "
                "path_initial_model_for_weight_conversion), which writes an equivalent plain LoRA",
            )
        )
    unsupported = {
        "layer_replication": "layer_replication (layers repeated by the adapter)",
        "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
        "use_qalora": "QALoRA (use_qalora)",
        "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    }
    for key, what in unsupported.items():
        if config.get(key):
            out.append(Finding("error", key, f"vLLM does not support {what}", merge))
    if config.get("trainable_token_indices"):
        out.append(
            Finding(
                "error",
                "trainable_tokens",
                "trainable_token_indices: the adapter carries trained embedding rows (trainable_tokens_delta), "
                "which vLLM's loader does not read (unsupported LoRA weight)",
                f"{merge}: the merged model holds the trained rows",
            )
        )
    if config.get("target_parameters"):
        out.append(
            Finding(
                "warning",
                "target_parameters",
                f"target_parameters {config['target_parameters']}: LoRA on stacked mixture-of-experts parameters; "
                "vLLM loads it only in recent releases and for MoE models whose experts it implements with LoRA",
                "try it on your vLLM version; otherwise " + merge,
            )
        )
    if config.get("use_rslora"):
        out.append(
            Finding("note", "rslora", "use_rslora: vLLM scales by lora_alpha / sqrt(r), as in training")
        )
    if config.get("layers_to_transform") is not None:
        out.append(
            Finding(
                "note",
                "layers",
                "layers_to_transform: vLLM adapts exactly the modules whose tensors are in the file, so the "
                "other layers stay as the base",
            )
        )
    return out


# -- tensors -----------------------------------------------------------------------------------------

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
# vllm/lora/utils.py is_base_embedding_weights: skipped on load (PEFT's save_embedding_layers)
_SKIPPED_BASE = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
_EMBEDDINGS = ("embed_tokens",)  # what vLLM's Llama-family models declare as embedding modules
_HEADS = ("lm_head",)


def tensor_shapes(directory: Path, report: VllmReport) -> dict[str, tuple[int, ...]] | None:
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        return _read_shapes(weights)
    pickles = [name for name in PICKLE_NAMES if (directory / name).is_file()]
    if pickles:
        report.findings.append(
            Finding(
                "warning",
                "weights",
                f"the weights are a pickle ({pickles[0]}); vLLM reads it, but this check does not unpickle files, so "
                "the module and rank checks were skipped",
                "save the adapter again as safetensors (save_adapter or save_pretrained) and check again",
            )
        )
        return None
    report.findings.append(
        Finding(
            "error",
            "weights",
            f"no {WEIGHTS_NAME} in the directory; vLLM refuses it (doesn't contain tensors)",
            "copy the weights next to adapter_config.json, or save the adapter again",
        )
    )
    return None


def tensor_findings(
    config: dict[str, Any], shapes: dict[str, tuple[int, ...]], report: VllmReport, merge: str
) -> tuple[list[Finding], dict[str, int]]:
    """Findings on the tensor names and shapes, and each adapted module's rank (from its A factor)."""
    out: list[Finding] = []
    modules: dict[str, tuple[str, tuple[int, ...]]] = {}  # module -> (kind of tensor, lora_A shape)
    ranks: dict[str, int] = {}
    unknown: list[str] = []
    skipped_base: list[str] = []
    for key, shape in shapes.items():
        if key.endswith(_SKIPPED_BASE):
            skipped_base.append(key)
            continue
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        module = key[: -len(suffix)].removeprefix(PREFIX)
        if suffix in (".lora_A.weight", ".lora_embedding_A"):
            embedding = suffix == ".lora_embedding_A"
            modules[module] = ("embedding" if embedding else "linear", shape)
            # LoRA's A is (r, in) for linear layers ((r, in, k...) for convolutions); the embedding A is (r, vocab)
            if shape:
                ranks[module] = int(shape[0])
    report.modules = sorted({module.rsplit(".", 1)[-1] for module in modules})
    unknown = [key for key in unknown if not _reported_from_config(key, config)]
    if unknown:
        out.append(
            Finding(
                "error",
                "tensors",
                f"{len(unknown)} tensor(s) that are not LoRA factors, e.g. {', '.join(unknown[:3])}; vLLM refuses "
                "the adapter (unsupported LoRA weight)",
                f"save only the LoRA factors (lora_A / lora_B), or {merge}",
            )
        )
    if skipped_base:
        out.append(
            Finding(
                "warning",
                "embeddings",
                f"the file holds base embedding weights ({', '.join(skipped_base)}), saved because the vocabulary "
                "was resized; vLLM skips them and serves the base model's own embeddings",
                f"serve a base model that has the resized vocabulary: {merge}",
            )
        )
    out += _module_findings(modules, merge)
    return out, ranks


def _reported_from_config(key: str, config: dict[str, Any]) -> bool:
    """Whether a tensor vLLM cannot load belongs to a feature already reported from the config."""
    parts = key.split(".")
    saved = config.get("modules_to_save") or []
    return bool(
        (config.get("use_dora") and "lora_magnitude_vector" in parts)
        or (config.get("lora_bias") and key.endswith(".lora_B.bias"))
        or (config.get("bias", "none") not in (None, "none") and parts[-1] == "bias")
        or (
            config.get("trainable_token_indices")
            and ("token_adapter" in parts or "trainable_tokens_delta" in key)
        )
        or any(name in parts for name in ([saved] if isinstance(saved, str) else saved))
    )


def _module_findings(modules: dict[str, tuple[str, tuple[int, ...]]], merge: str) -> list[Finding]:
    out: list[Finding] = []
    convolutions = sorted(m for m, (kind, shape) in modules.items() if kind == "linear" and len(shape) != 2)
    if convolutions:
        out.append(
            Finding(
                "error",
                "targets",
                f"LoRA on convolutions ({', '.join(convolutions[:3])}): vLLM puts LoRA on linear layers and "
                "embeddings only, and refuses an adapter with any other module (expected target modules in ...)",
                f"retrain with target_modules on the linear projections (e.g. q_proj, v_proj), or {merge}",
            )
        )
    embeddings = sorted(m for m, (kind, _) in modules.items() if kind == "embedding")
    odd = [m for m in embeddings if m.rsplit(".", 1)[-1] not in _EMBEDDINGS]
    if odd:
        out.append(
            Finding(
                "warning",
                "targets",
                f"LoRA on the embedding(s) {', '.join(odd[:3])}: vLLM adapts an embedding only where its model "
                "declares it (embed_tokens in Llama, Mistral, Qwen2 ...), and refuses the adapter otherwise",
                f"if vLLM refuses it, retrain without the embedding among target_modules, or {merge}",
            )
        )
    elif embeddings:
        out.append(
            Finding(
                "note",
                "targets",
                "LoRA on embed_tokens: vLLM serves it for models that declare it (Llama, Mistral, Qwen2 ...); "
                "the adapter's vocabulary must be the base model's",
            )
        )
    linear = [m for m, (kind, shape) in modules.items() if kind == "linear" and len(shape) == 2]
    heads = sorted(m for m in linear if m.rsplit(".", 1)[-1] in _HEADS)
    if heads:
        out.append(
            Finding(
                "warning",
                "targets",
                "LoRA on lm_head: vLLM serves it only for models that declare lm_head as a LoRA embedding module "
                "(Llama, Mistral, Qwen2 ...) and refuses the adapter elsewhere",
                f"if vLLM refuses it, retrain without lm_head among target_modules, or {merge}",
            )
        )
    # vLLM offers LoRA on its models' linear layers, found by the last name part (q_proj, down_proj ...);
    # the projections inside the repeated blocks exist in every model. Outside them (a classifier, a
    # projector of a vision tower) it depends on the model's vLLM implementation.
    outside = sorted(m for m in linear if m not in heads and not re.search(r"\.\d+\.", f".{m}."))
    if outside:
        out.append(
            Finding(
                "warning",
                "targets",
                f"LoRA on module(s) outside the repeated layers ({', '.join(outside[:3])}): vLLM accepts a module "
                "only if its implementation of the model has a linear layer of that name, and refuses the whole "
                "adapter otherwise (expected target modules in ...)",
                f"if vLLM refuses it, retrain with target_modules on the layers' projections, or {merge}",
            )
        )
    return out


def rank_findings(
    config: dict[str, Any], report: VllmReport, module_ranks: dict[str, int], given: Path
) -> list[Finding]:
    out: list[Finding] = []
    r = config.get("r")
    pattern = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        out.append(
            Finding(
                "error", "rank", f"r must be a positive integer, got {r!r}; vLLM refuses it", "save it again"
            )
        )
        return out
    declared = [r, *(v for v in pattern.values() if isinstance(v, int))]
    report.rank = max([*declared, *module_ranks.values()])
    needed = report.max_lora_rank
    if needed is None:
        out.append(
            Finding(
                "error",
                "rank",
                f"rank {report.rank} is above {MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM offers "
                f"({', '.join(map(str, MAX_LORA_RANKS))})",
                f"write it at a lower rank: `peftkit convert {given} --to lora --rank "
                f"{MAX_LORA_RANKS[-1]} --out OUT` (a truncated SVD; see docs/combine.md), or merge it",
            )
        )
    elif needed > DEFAULT_MAX_LORA_RANK:
        out.append(
            Finding(
                "warning",
                "rank",
                f"rank {report.rank} is above vLLM's default --max-lora-rank {DEFAULT_MAX_LORA_RANK}; without the "
                f"flag vLLM refuses it (LoRA rank {report.rank} is greater than max_lora_rank)",
                f"pass --max-lora-rank {needed} to vllm serve (the command printed when it passes does); every "
                "adapter slot of the server then reserves memory for that rank",
            )
        )
    if pattern or alphas:
        out += _scaling_findings(config, r, pattern, alphas, module_ranks)
    return out


def _scaling_findings(
    config: dict[str, Any], r: int, pattern: dict, alphas: dict, module_ranks: dict[str, int]
) -> list[Finding]:
    """rank_pattern / alpha_pattern: per-module scalings that older vLLM releases ignore."""
    alpha = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))

    def scale(rank: int, a: float) -> float:
        return a / rank**0.5 if rslora else a / rank

    def lookup(table: dict, name: str) -> Any:
        # the reference library's rule: a key matches the end of the module name at a "." boundary
        for key, value in table.items():
            try:
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
            except re.error:
                continue
        return None

    names = list(module_ranks) or list(pattern) + list(alphas)
    differing = []
    for name in names:
        rank = lookup(pattern, name) or r
        module_alpha = lookup(alphas, name)
        if abs(scale(rank, alpha if module_alpha is None else module_alpha) - scale(r, alpha)) > 1e-9:
            differing.append(name)
    if not differing:
        return [
            Finding(
                "note",
                "patterns",
                "rank_pattern / alpha_pattern give some modules their own rank, with the same scaling as the rest",
            )
        ]
    return [
        Finding(
            "warning",
            "patterns",
            f"rank_pattern / alpha_pattern give {len(differing)} module(s) (e.g. {differing[0]}) a scaling other "
            "than lora_alpha / r; recent vLLM reads both patterns, older releases scale every module by "
            "lora_alpha / r and serve different outputs",
            "use a vLLM release whose PEFTHelper reads rank_pattern and alpha_pattern, or write it with one "
            "scaling: `peftkit convert DIR --to lora --out OUT` (scaling 1 everywhere)",
        )
    ]
