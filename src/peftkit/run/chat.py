"""``peftkit chat RUN_DIR``: talk to a trained causal-LM run, turn by turn, in its chat template.

Each line typed is a user turn; the answer is generated with the run's ``generation`` settings (or the
command's options) from the whole conversation so far, rendered the way the run was trained (its chat
template or plain text, its ``data.system_prompt``), and becomes the next assistant turn. On a
terminal the answer is printed as it is generated. A line ending in a backslash continues on the next
one (a message of several lines). ``/reset`` starts a new conversation and ``/exit`` (or end of
input, Ctrl-D) ends the session. Lines can also come from a pipe, so a session can be scripted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError
from .runner import load_run, with_generation

COMMANDS = {
    "/reset": "start a new conversation",
    "/exit": "end the session (also Ctrl-D)",
    "/help": "this list",
}
FALLBACK_CONTEXT = 2048  # tokens of history kept when the model does not say how many it can read


def chat_session(
    run_dir: str,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
    generation: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
    stream: bool = False,
) -> list[dict[str, str]]:
    """Run a chat with the run in ``run_dir`` until ``/exit`` or end of input; returns the last conversation.

    Args:
        run_dir: A ``task: causal-lm`` run directory.
        read: Gets a line of user input (raises EOFError at the end).
        write: Shows a line (a finished answer, a notice).
        generation: Changes to the run's ``generation`` settings, e.g. ``{"temperature": 0.7}``.
        system_prompt: A system message for this session, instead of the run's ``data.system_prompt``.
        stream: Print each answer to standard output as it is generated (instead of through ``write``).

    Raises:
        ConfigError: the run is not a causal-LM run, or a generation setting is out of range.
        FileNotFoundError: ``run_dir`` is not a run directory or holds no weights.
    """
    loaded = load_run(run_dir)
    task = loaded.task
    if not getattr(task, "conversations", False):
        raise ConfigError(
            [
                f"task: peftkit chat talks to causal-lm runs; {run_dir!r} is a {loaded.config.task!r} "
                "run: use `peftkit predict` for it"
            ],
            what="chat",
        )
    with_generation(loaded, generation or {}, stream=stream)
    if system_prompt is not None:
        loaded.config.data.system_prompt = system_prompt
    # A chat keeps its history, which outgrows the short data.max_length training examples are cut to:
    # keep as much as the model can read, leaving room for the answer.
    positions = getattr(loaded.model.config, "max_position_embeddings", None) or FALLBACK_CONTEXT
    loaded.config.data.max_length = max(
        loaded.config.data.max_length, positions - loaded.config.generation.max_new_tokens
    )
    streamer = None
    if stream:
        from ..tasks.generation import terminal_streamer

        streamer = terminal_streamer(task._load_tokenizer())
    history: list[dict[str, str]] = []
    while True:
        try:
            line = _message(read)
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                write("(new conversation)")
            else:
                write("commands: " + "; ".join(f"{c} {what}" for c, what in COMMANDS.items()))
            continue
        history.append({"role": "user", "content": line})
        history = _fitting(task, history, loaded.config.data.max_length)
        answer = task.predict(loaded.model, [{"messages": history}], 1, streamer=streamer)[0]
        if streamer is None:
            write(answer)
        history.append({"role": "assistant", "content": answer})
    return history


def _fitting(task: Any, history: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """``history`` without its oldest exchanges until its prompt fits ``limit`` tokens: whole turns go,
    so the system prompt and the template's framing stay intact (the newest message always stays)."""
    while len(history) > 1 and len(task.encode_prompt({"messages": history})) > limit:
        history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
    return history


def _message(read: Callable[[str], str]) -> str:
    """One user message: a line, or several joined where a line ends in a backslash."""
    lines = [read("you> ").rstrip("\r\n")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read("...> ").rstrip("\r\n"))
        except EOFError:
            break
    return "\n".join(lines).strip()
