"""Chat and instruction records for causal-LM tasks: three common layouts read into one conversation form.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}`` messages,
the OpenAI ``messages`` form every chat template reads. Data files come in three layouts:

* ``messages``: a column ``messages`` holding that list (OpenAI fine-tuning files, TRL's
  conversational data sets);
* ``sharegpt``: a column ``conversations`` holding ``{"from": "system" | "human" | "gpt", "value": str}``
  turns (ShareGPT exports, Vicuna-style data sets; ``user`` / ``assistant`` are read too);
* ``alpaca``: columns ``instruction``, optional ``input``, and ``output`` (Stanford Alpaca and its many
  copies): one user turn (the instruction, then the input after a blank line when there is one) and
  one assistant turn.

``data.format`` names the layout, or it is recognised from the columns (:func:`detect_layout`);
``data.columns.messages`` renames the column holding the turns. A file with ``prompt`` and
``response`` columns stays a single-turn example, read as a user and an assistant turn.

This module also checks and reads ``data.chat_template``: inline Jinja, or the path of a file holding
it (a ``.jinja`` file, or a tokenizer's ``chat_template.jinja``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

LAYOUTS = ("messages", "sharegpt", "alpaca")
CONVERSATION_KEY = "messages"  # the key a converted example keeps its turns under
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names as the exports write them -> OpenAI roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
_COLUMN = {"messages": "messages", "sharegpt": "conversations"}
MAX_SHOWN = 5

Message = dict[str, str]


def detect_layout(columns: Sequence[str], *, answered: bool = True) -> str | None:
    """The chat layout a file (or one record) with these columns is in, or None (e.g. prompt /
    response columns). ``answered=False``: an Alpaca prompt to answer has no ``output`` yet."""
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and ("output" in columns or not answered):
        return "alpaca"
    return None


def required_columns(layout: str, columns: Mapping[str, str]) -> list[str]:
    """The file columns ``layout`` reads (``data.columns.messages`` renames the turns column)."""
    if layout == "alpaca":
        return ["instruction", "output"]
    return [columns.get(CONVERSATION_KEY, _COLUMN[layout])]


def conversations(
    rows: Sequence[Mapping[str, Any]], layout: str, columns: Mapping[str, str], where: str
) -> list[dict[str, Any]]:
    """Every row as ``{"messages": [...]}``; every malformed row is reported at once (the first few).

    Raises:
        ConfigError: a row whose turns are not a list of role / content pairs, a role that is not system,
            user or assistant, or a conversation without an assistant turn (nothing to learn from).
    """
    out, problems = [], []
    for number, row in enumerate(rows, 1):
        try:
            out.append({CONVERSATION_KEY: to_messages(row, layout, columns)})
        except ValueError as exc:
            problems.append(f"row {number}: {exc}")
    if problems:
        shown = problems[:MAX_SHOWN] + (
            [f"... and {len(problems) - MAX_SHOWN} more rows"] if len(problems) > MAX_SHOWN else []
        )
        raise ConfigError(
            shown + [f"fix these rows, or set data.format if the file is not in the {layout} layout"],
            what=f"{layout} records in {where}",
        )
    return out


def to_messages(
    record: Mapping[str, Any], layout: str, columns: Mapping[str, str] | None = None, *, answered: bool = True
) -> list[Message]:
    """One record in ``layout`` as a list of OpenAI-style messages; ``answered``: it must hold an
    assistant turn (training data does; a conversation to continue need not).

    Raises:
        ValueError: the record is malformed (the message says how).
    """
    columns = columns or {}
    if layout == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("'instruction' is empty")
        if not isinstance(output, str) and answered:
            raise ValueError("'output' is missing")
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        answer = [{"role": "assistant", "content": output}] if isinstance(output, str) else []
        return [{"role": "user", "content": user}, *answer]
    key = columns.get(CONVERSATION_KEY, _COLUMN[layout])
    turns = record.get(key)
    if isinstance(turns, list) and not turns:
        raise ValueError(f"{key!r} is an empty list of turns")
    if isinstance(turns, str):
        raise ValueError(
            f"{key!r} is text, not a list of turns (a CSV cell holds text: keep chat data in JSONL "
            "or Parquet, where a turn list stays a list)"
        )
    if not isinstance(turns, list):
        raise ValueError(f"{key!r} is not a list of turns (got {type(turns).__name__})")
    messages = [_message(turn, layout, i) for i, turn in enumerate(turns, 1)]
    if answered and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn, so nothing to learn from")
    return messages


def _message(turn: Any, layout: str, index: int) -> Message:
    if not isinstance(turn, Mapping):
        raise ValueError(f"turn {index} is {type(turn).__name__}, not an object")
    if layout == "sharegpt":
        speaker, content = turn.get("from"), turn.get("value")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise ValueError(
                f"turn {index}: 'from' is {speaker!r}; expected one of {', '.join(sorted(SHAREGPT_ROLES))}"
            )
    else:
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ValueError(f"turn {index}: 'role' is {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(
            f"turn {index}: no text ({'value' if layout == 'sharegpt' else 'content'} is {content!r})"
        )
    return {"role": role, "content": content}


def with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """``messages`` with ``system_prompt`` put first, unless it is None or the conversation has its own."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


# -- data.chat_template ----------------------------------------------------------------------------


def is_template_file(value: str) -> bool:
    """Whether ``data.chat_template`` names a file rather than holding the template itself."""
    return not any(marker in value for marker in ("{{", "{%")) and "\n" not in value


def load_template(value: str) -> str:
    """The Jinja text of ``data.chat_template`` (read from the file it names, if it names one).

    Raises:
        ConfigError: the file does not exist, or the template is not valid Jinja.
    """
    problem = template_problem(value)
    if problem:
        raise ConfigError([f"data.chat_template: {problem}"], what="data config")
    return Path(value).expanduser().read_text(encoding="utf-8") if is_template_file(value) else value


def template_problem(value: str | None) -> str | None:
    """What is wrong with a ``data.chat_template`` value, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return "expected inline Jinja or the path of a template file, got an empty value"
    text = value
    if is_template_file(value):
        path = Path(value).expanduser()
        if not path.is_file():
            return (
                f"{value!r} is neither a template (no '{{{{' or '{{%') nor an existing file (relative paths "
                f"start from {str(Path.cwd())!r}); give inline Jinja or the path of a .jinja file"
            )
        text = path.read_text(encoding="utf-8")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"not a valid Jinja template (line {exc.lineno}: {exc.message})"
    return None
