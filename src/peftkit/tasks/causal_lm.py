"""Causal-LM instruction tuning with a decoder (SmolLM2, Llama, GPT-2 ...): ``task: causal-lm``.

An example is ``{"prompt": str, "response": str}`` (``data.columns`` maps file columns to these roles;
the bundled ``freedict_eng_fra`` data set gives them ready, with a translation instruction as prompt).

Encoding: when the tokenizer has a chat template, the prompt is the single user turn rendered with
``add_generation_prompt=True`` (so it ends where the assistant's answer starts); otherwise it is the
plain text ``"{prompt}\\n"``. The response follows as its own tokens plus the EOS token, so the model
learns to stop. Prompt tokens are masked out of the loss (label -100): the model is trained only on
answers. Over-long examples keep the whole response (up to ``data.max_length - 1`` tokens) and drop
the start of the prompt. Training batches are right-padded (pad positions are masked out of attention
and loss); generation batches are left-padded, so every prompt ends at the same position and new
tokens follow it directly.

``evaluate`` reports the token-mean loss on responses (teacher forcing), its perplexity, and, from
greedy generation (``eval.max_new_tokens`` new tokens), normalised exact match and corpus chrF
(``peftkit.text_metrics``). ``predict`` returns the generated strings. A translation recipe is this
task on translation pairs (``configs/translate-smollm2-lora.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import text_metrics
from ..data.files import load_examples
from ..data.general_text import GENERAL_TEXT_SOURCE, general_texts
from ..errors import ConfigError
from ..models import bundled_model_path, explain_missing, quiet_transformers
from .base import Batch, Example, eval_mode, register_task
from .probes import BehaviourProbe

if TYPE_CHECKING:
    from ..run.schema import ModelConfig, RunConfig

ROLES = ["prompt", "response"]
IGNORE = -100  # the label value cross entropy skips (torch's and transformers' convention)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Metrics computed from generated text; "loss" and "perplexity" come from teacher forcing, always.
TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": text_metrics.exact_match,
    "chrf": text_metrics.chrf,
}


class GenerationTask:
    """What the two generation tasks share: config checks, where the model comes from, data and tokenizer
    loaded once. ``roles`` names the example keys the data must provide.

    Attributes:
        config: The whole run config.
        tokenizer: The model's tokenizer (loaded with the model, or on first use); may be set directly.
        data_info: How the data was loaded and split (``peftkit.data.files.Splits.info``), once loaded.
    """

    name: str
    roles: list[str]
    reference_role: str  # the example key generations are scored against
    input_role = ROLES[0]  # the key `peftkit predict` reads from a JSON input
    default_metric = "chrf"
    greater_is_better = True

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.tokenizer: Any = None
        self.data_info: dict[str, Any] | None = None
        self._splits: dict[str, list[dict[str, Any]]] | None = None
        problems = config_problems(config)
        if problems:
            raise ConfigError(problems, what=f"{self.name} config")

    def model_source(self) -> str:
        """A local directory (a bundled model's, or the given one) or a hub id."""
        name = self.config.model.name_or_path
        return bundled_model_path(name) or name

    def load_data(self) -> dict[str, Sequence[Example]]:
        """The configured splits (examples with the task's ``roles``), loaded once.

        Raises:
            ConfigError: bad data config (no data, missing columns ...).
            DataNotInstalledError: a bundled data set's package is not installed.
        """
        if self._splits is None:
            splits = load_examples(self.config.data, self.roles)
            self.data_info = dict(splits.info)
            self._splits = dict(splits)
        return self._splits

    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.config.model, self.model_source())
        return self.tokenizer

    def _pad_id(self) -> int:
        tokenizer = self._load_tokenizer()
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
        """Loss and perplexity on the answers (teacher forcing), exact match and chrF of greedy generations
        against the ``reference_role`` text of each example.

        ``eval.metrics`` may restrict the generated-text metrics (``exact_match``, ``chrf``); with
        neither requested no text is generated.

        Raises:
            ValueError: ``examples`` is empty or ``batch_size`` is not positive.
        """
        if not examples:
            raise ValueError("no examples to evaluate: the split is empty; check data.split or data.files")
        mean_nll = teacher_forced_nll(model, self.collate, examples, batch_size)
        result = {"loss": mean_nll, "perplexity": text_metrics.perplexity(mean_nll)}
        wanted = [m for m in (self.config.eval.metrics or list(TEXT_METRICS)) if m in TEXT_METRICS]
        if wanted:
            predictions = self.predict(model, examples, batch_size)
            references = [role_text(e, self.reference_role) for e in examples]
            result.update({m: TEXT_METRICS[m](predictions, references) for m in wanted})
        return result


@register_task("causal-lm")
class CausalLMTask(GenerationTask):
    """Instruction tuning of a decoder-only model; see the module docstring for encoding and metrics."""

    roles = ROLES
    reference_role = "response"

    # -- loading -------------------------------------------------------------------------------

    def load_model(self) -> nn.Module:
        """The pretrained decoder (``AutoModelForCausalLM``) on CPU in ``model.dtype``; loads the tokenizer.

        Raises:
            OSError: the model cannot be found (the message says where it was looked for).
        """
        from transformers import AutoModelForCausalLM

        return load_pretrained(AutoModelForCausalLM, self.config, self.model_source(), self._load_tokenizer)

    # -- encoding, batches and loss ----------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt up to where the answer starts (chat template or ``"prompt\\n"``)."""
        tokenizer = self._load_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            # The rendered template already holds its special tokens as text (<|im_start|> ...).
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(f"{prompt}\n", add_special_tokens=True)["input_ids"])

    def encode_response(self, response: str) -> list[int]:
        """Token ids of an answer followed by EOS (when the tokenizer has one), the stop signal."""
        tokenizer = self._load_tokenizer()
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example, truncated to ``data.max_length`` (labels -100 on the prompt)."""
        prompt = self.encode_prompt(role_text(example, "prompt"))
        response = self.encode_response(role_text(example, "response"))
        limit = self.config.data.max_length
        # Keep at least one prompt token: the first answer token is predicted from it.
        response = response[: limit - 1]
        prompt = prompt[-(limit - len(response)) :]
        return prompt + response, [IGNORE] * len(prompt) + response

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
        encoded = [self.encode(e) for e in examples]
        ids, mask = pad([e[0] for e in encoded], self._pad_id(), side="right")
        labels, _ = pad([e[1] for e in encoded], IGNORE, side="right")
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross entropy over every answer token of the batch (prompt and padding excluded)."""
        nll, count = token_nll(model, batch)
        return nll.sum() / count.sum().clamp(min=1)

    # -- evaluation and prediction ---------------------------------------------------------------

    def behaviour_probe(self, model: nn.Module, n: int, batch_size: int) -> BehaviourProbe:
        """Mean next-token loss on ``n`` held-out general texts (``peftkit.data.general_text``, plain
        text without the chat template, ``data.max_length`` tokens at most): what ``peftkit compare``
        measures forgetting with."""
        tokenizer = self._load_tokenizer()
        limit = self.config.data.max_length
        sequences = [tokenizer(t, truncation=True, max_length=limit)["input_ids"] for t in general_texts(n)]

        def collate(chunk: Sequence[Sequence[int]]) -> Batch:
            ids, mask = pad(chunk, self._pad_id(), side="right")
            return {"input_ids": ids, "attention_mask": mask, "labels": pad(chunk, IGNORE, side="right")[0]}

        return BehaviourProbe("lm_loss", GENERAL_TEXT_SOURCE, value=teacher_forced_nll(model, collate, sequences, batch_size))

    def predict(self, model: nn.Module, inputs: Sequence[Any], batch_size: int) -> list[str]:
        """The greedy answer (``eval.max_new_tokens`` tokens at most, up to EOS) to each prompt, in order.

        Args:
            model: The decoder (with or without an adapter).
            inputs: Prompt strings, or mappings with a ``"prompt"`` key.
            batch_size: Prompts per ``generate`` call.
        """
        tokenizer = self._load_tokenizer()
        limit = self.config.data.max_length
        prompts = [self.encode_prompt(role_text(item, "prompt"))[-limit:] for item in inputs]
        return generate_texts(
            model, tokenizer, prompts, batch_size, self.config.eval.max_new_tokens, self._pad_id(), left_pad=True
        )


# -- shared with the seq2seq task -----------------------------------------------------------------


def config_problems(config: RunConfig) -> list[str]:
    """Every problem in the config sections a text-generation task reads, to report together."""
    problems = []
    if config.model.dtype not in DTYPES:
        problems.append(f"model.dtype: expected one of {', '.join(DTYPES)}, got {config.model.dtype!r}")
    if config.data.max_length < 2:
        problems.append(f"data.max_length: expected at least 2 tokens (prompt + answer), got {config.data.max_length}")
    if config.eval.max_new_tokens <= 0:
        problems.append(f"eval.max_new_tokens: expected a positive number of tokens, got {config.eval.max_new_tokens}")
    known = ["loss", "perplexity", *TEXT_METRICS]
    unknown = [m for m in config.eval.metrics if m not in known]
    if unknown:
        problems.append(f"eval.metrics: {unknown} unknown for text generation; known: {', '.join(known)}")
    return problems


def load_pretrained(auto_class: Any, config: RunConfig, source: str, load_tokenizer: Callable[[], Any]) -> nn.Module:
    """``auto_class.from_pretrained(source)`` in ``model.dtype`` (GGUF too), quietly, with the tokenizer.

    Raises:
        OSError: the model cannot be found (the message says where it was looked for).
    """
    kwargs: dict[str, Any] = {"dtype": DTYPES[config.model.dtype]}
    if config.model.gguf_file:
        kwargs["gguf_file"] = config.model.gguf_file
    if config.model.quantize:
        from ..backends.bitsandbytes import bnb_config

        # Naming modules to skip replaces transformers' default list, which keeps lm_head dense.
        kwargs["quantization_config"] = bnb_config(
            config.model.quantize, config.model.double_quant, DTYPES[config.model.dtype], ["lm_head"]
        )
    with quiet_transformers(), explain_missing(config.model.name_or_path):
        model = auto_class.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer()
    if config.model.quantize:
        from ..backends.kbit import prepare_for_kbit_training

        prepare_for_kbit_training(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_tokenizer(model: ModelConfig, source: str) -> Any:
    """The tokenizer at ``source`` (from ``model.gguf_file`` when set), with a pad token (EOS when it has none).

    Raises:
        OSError: the tokenizer cannot be found.
    """
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": model.gguf_file} if model.gguf_file else {}
    with quiet_transformers(), explain_missing(model.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:  # decoders often have none; batches need one (positions are masked)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad(sequences: Sequence[Sequence[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded [B, T], mask [B, T])``: sequences padded with ``value`` on the ``side`` ("left"/"right")."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            where = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            out[i, where] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, where] = 1
    return out, mask


def token_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed negative log-likelihood of its labelled tokens, and how many there are.

    A decoder's logits at position t predict token t + 1, so labels are shifted by one; an
    encoder-decoder model (labels in the batch feed its decoder) predicts position t itself.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(**{k: v for k, v in batch.items() if k != "labels" or model.config.is_encoder_decoder}).logits
    labels = batch["labels"]
    if not model.config.is_encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=1), (labels != IGNORE).sum(dim=1)


def teacher_forced_nll(
    model: nn.Module, collate: Callable[[Sequence[Example]], Batch], examples: Sequence[Example], batch_size: int
) -> float:
    """Mean NLL per labelled token over ``examples``, in eval mode without gradients."""
    _check_batch_size(batch_size)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            nll, n = token_nll(model, collate(examples[start : start + batch_size]))
            total, count = total + nll.sum().item(), count + int(n.sum().item())
    return total / max(count, 1)


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    inputs: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int,
    pad_id: int,
    *,
    left_pad: bool,
) -> list[str]:
    """Greedy generations for token-id inputs, decoded without special tokens and stripped, in order.

    Decoders get left-padded prompts and their output after the prompt; encoder-decoders get
    right-padded sources and their whole decoder output.
    """
    from transformers import GenerationConfig

    _check_batch_size(batch_size)
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
    )
    device = next(model.parameters()).device
    # Similar lengths in a batch keep padding, and so generation time, small.
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = [""] * len(inputs)
    with eval_mode(model), quiet_transformers():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad([inputs[i] for i in idx], pad_id, side="left" if left_pad else "right")
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=settings
            )
            new = generated[:, ids.shape[1] :] if left_pad else generated
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
    return out




def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def role_text(item: Any, role: str) -> str:
    """The ``role`` text of an example (a mapping), or the item itself when it is a plain string."""
    if isinstance(item, Mapping):
        if role not in item:
            raise KeyError(f"example has no {role!r} (keys: {sorted(item)}); map a column to it with data.columns.{role}")
        value = item[role]
    else:
        value = item
    return value if isinstance(value, str) else str(value)
