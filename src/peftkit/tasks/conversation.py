"""Token ids and loss labels of a conversation, for training a decoder on its assistant turns only.

With a chat template the conversation is rendered the way the model will see it at inference time:
each message's text is what the template adds for it (rendering the first ``k + 1`` messages minus
rendering the first ``k``), and an assistant turn is split into its header (the text the template adds
with ``add_generation_prompt=True``, masked like the other turns) and its body (content plus the
template's end-of-turn text), which carries the loss. A template that ends a turn without the EOS
token gets EOS appended to each assistant body, so the model learns to stop; the last turn is cut
just after its EOS, so nothing follows the stop signal. Without a chat template a conversation is
plain text: each system or user message followed by a newline, each answer followed by EOS (for a
single prompt and answer: ``"prompt\\n"`` then ``answer<eos>``).

Templates that rewrite earlier turns when later ones follow (some drop a reasoning block from past
answers) cannot be split this way; they are reported with the fix (``data.chat_template``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

IGNORE = -100  # the label value cross entropy skips
Message = dict[str, str]


class ConversationEncoder:
    """Encodes conversations (lists of role / content messages) with one tokenizer.

    Args:
        tokenizer: A transformers tokenizer; its ``chat_template`` (if any) decides the rendering.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    # -- training ----------------------------------------------------------------------------------

    def encode(self, messages: Sequence[Message], max_length: int) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``: labels are -100 except on assistant turns.

        A conversation longer than ``max_length`` keeps its last answer (up to ``max_length - 1``
        tokens) and drops tokens from the start: the first answer token is predicted from at least one
        token before it.
        """
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("a conversation to train on needs an assistant turn")
        pieces = self._pieces(messages[: last + 1])
        ids: list[int] = []
        labels: list[int] = []
        for n, (tokens, trained) in enumerate(pieces):
            if n == len(pieces) - 1:  # the last answer: at most max_length - 1 tokens, ending at EOS
                tokens = self._through_eos(tokens)[: max_length - 1]
            ids += tokens
            labels += tokens if trained else [IGNORE] * len(tokens)
        return ids[-max_length:], labels[-max_length:]

    # -- generation ----------------------------------------------------------------------------------

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` up to where the next answer starts (a final answer is left out).

        Earlier answers are encoded exactly as in training (with the EOS a template may not write), so
        a multi-turn prompt looks like the conversations the model was trained on.
        """
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return [t for tokens, _ in self._pieces(messages, generation=True) for t in tokens]

    # -- how a conversation becomes token pieces ------------------------------------------------------

    def _pieces(self, messages: Sequence[Message], generation: bool = False) -> list[tuple[list[int], bool]]:
        """Consecutive token runs, each marked trained (an answer) or not; masked text is tokenized in
        one run so the tokens are those of the whole string. ``generation``: end with the text that
        opens the next answer."""
        texts = self._template_texts(messages) if self.templated else self._plain_texts(messages)
        if generation and self.templated:
            rendered = self._render(messages, generation=False) if messages else ""
            texts.append(
                (self._after(rendered, self._render(messages, generation=True), len(messages)), False)
            )
        pieces: list[tuple[list[int], bool]] = []
        pending = ""
        for text, trained in texts:
            if not trained:
                pending += text
                continue
            if pending:
                pieces.append((self._tokens(pending, first=not pieces), False))
                pending = ""
            pieces.append((self._answer_tokens(text), True))
        if pending:
            pieces.append((self._tokens(pending, first=not pieces), False))
        return pieces

    def _plain_texts(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
        return [
            (m["content"] if m["role"] == "assistant" else m["content"] + "\n", m["role"] == "assistant")
            for m in messages
        ]

    def _template_texts(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
        texts: list[tuple[str, bool]] = []
        before = ""
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                header = self._render(messages[:k], generation=True) if k else ""
                texts.append((self._after(before, header, k), False))
                before = header
            rendered = self._render(messages[: k + 1], generation=False)
            texts.append((self._after(before, rendered, k), message["role"] == "assistant"))
            before = rendered
        return texts

    def _render(self, messages: Sequence[Message], generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=generation, tokenize=False
            )
        except Exception as exc:  # noqa: BLE001 - jinja raises from inside the template (e.g. "System role not supported")
            raise ConfigError(
                [
                    f"the chat template cannot render this conversation ({type(exc).__name__}: {exc}); give one that "
                    "can with data.chat_template, or drop data.system_prompt if the template refuses system messages"
                ],
                what="chat template",
            ) from None

    @staticmethod
    def _after(before: str, text: str, index: int) -> str:
        if not text.startswith(before):
            raise ConfigError(
                [
                    f"the chat template changes earlier turns when message {index + 1} is added (it is not rendered "
                    "turn by turn), so the answers cannot be told apart from the rest; give a template that renders "
                    "each message independently with data.chat_template"
                ],
                what="chat template",
            )
        return text[len(before) :]

    def _tokens(self, text: str, *, first: bool) -> list[int]:
        # A rendered template holds its special tokens as text (<|im_start|> ...); plain text gets the
        # tokenizer's BOS at the very start, as the model saw in pretraining.
        special = first and not self.templated
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _answer_tokens(self, text: str) -> list[int]:
        tokens = self._tokens(text, first=False)
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in tokens:
            tokens.append(eos)  # the stop signal the model must learn (the template wrote none)
        return tokens

    def _through_eos(self, tokens: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens
