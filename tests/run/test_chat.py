"""Chat data (OpenAI messages, ShareGPT, Alpaca), loss on assistant turns, system prompt and chat
template override, generation settings, `predict --stream` and `peftkit chat` (issue 19, items 11-12),
on a tiny Llama with a character-level tokenizer."""

from __future__ import annotations

import io
import json

import pytest
import torch

from peftkit.cli import main
from peftkit.data.config import DataConfig
from peftkit.data.files import load_examples
from peftkit.errors import ConfigError
from peftkit.models.config import ModelConfig
from peftkit.run.chat import chat_session
from peftkit.run.config import load_config
from peftkit.run.runner import predict_run, train_run
from peftkit.run.schema import RunConfig
from peftkit.tasks.causal_lm import IGNORE, CausalLMTask
from peftkit.tasks.config import GenerationSettings
from peftkit.tasks.generation import generation_config, settings_of
from support.generation import CHAT_TEMPLATE, char_tokenizer, make_task, tiny_llama

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "cat?"},
    {"role": "assistant", "content": "chat"},
]
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
ALPACA = {"instruction": "translate", "input": "cat", "output": "chat"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_spans(task, example):
    """The decoded runs of tokens that carry the loss."""
    ids, labels = task.encode(example)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                spans.append(task.tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return spans + ([task.tokenizer.decode(current)] if current else [])


# -- reading the three layouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,row,declared",
    [
        ("messages", {"messages": CONVERSATION}, None),
        ("sharegpt", SHAREGPT, None),
        ("alpaca", ALPACA, None),
        ("sharegpt", SHAREGPT, "sharegpt"),
    ],
)
def test_each_layout_is_read_as_messages(tmp_path, layout, row, declared):
    path = write_jsonl(tmp_path / "chat.jsonl", [row] * 10)
    data = DataConfig(files=str(path), format=declared)
    data.split.validation = data.split.test = 0.0
    examples = load_examples(data, ["prompt", "response"], conversations=True)["train"]
    assert len(examples) == 10
    messages = examples[0]["messages"]
    assert messages[-1]["role"] == "assistant" and all(set(m) == {"role", "content"} for m in messages)
    if layout == "alpaca":
        assert messages == [
            {"role": "user", "content": "translate\n\ncat"},
            {"role": "assistant", "content": "chat"},
        ]
    if layout == "sharegpt":
        assert [m["role"] for m in messages] == ["user", "assistant"]


def test_prompt_response_columns_stay_single_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "cat", "response": "chat", "instruction": "x", "output": "y"}] * 4,
    )
    data = DataConfig(files=str(path))
    assert load_examples(data, ["prompt", "response"], conversations=True)["train"][0] == {
        "prompt": "cat",
        "response": "chat",
    }


def test_a_renamed_turns_column_and_malformed_rows_are_reported_by_row(tmp_path):
    rows = [{"chat": CONVERSATION}] * 3 + [
        {"chat": [{"role": "robot", "content": "x"}]},
        {"chat": [{"role": "user", "content": "q"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = DataConfig(files=str(path), format="messages", columns={"messages": "chat"})
    with pytest.raises(ConfigError) as info:
        load_examples(data, ["prompt", "response"], conversations=True)
    text = str(info.value)
    assert "row 4: turn 1: 'role' is 'robot'" in text and "row 5: no assistant turn" in text
    missing = DataConfig(files=str(path), format="messages")
    with pytest.raises(
        ConfigError, match=r"column 'messages' is not in .*its columns are: chat; set data.columns.messages"
    ):
        load_examples(missing, ["prompt", "response"], conversations=True)


def test_a_chat_layout_for_a_classification_task_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION, "text": "a", "label": "b"}] * 3)
    with pytest.raises(
        ConfigError, match="data.format: 'messages' is a chat layout, which only causal-LM tasks read"
    ):
        load_examples(DataConfig(files=str(path), format="messages"), ["text", "label"])


# -- encoding: the loss falls on assistant turns only ----------------------------------------------


def test_multi_turn_template_trains_every_answer_and_nothing_else():
    task = make_task(CHAT_TEMPLATE, max_length=200)
    spans = trained_spans(task, {"messages": CONVERSATION})
    assert spans == ["yo\n</s>", "chat\n</s>"]
    ids, _ = task.encode({"messages": CONVERSATION})
    assert task.tokenizer.decode(ids).startswith(
        "<s>system: be brief\n<s>user: hi\n<s>assistant: yo\n</s><s>user: cat?"
    )


def test_multi_turn_plain_text_without_a_template():
    task = make_task(None, max_length=200)
    ids, _ = task.encode({"messages": CONVERSATION})
    assert task.tokenizer.decode(ids) == "be brief\nhi\nyo</s>cat?\nchat</s>"  # this tokenizer adds no BOS
    assert trained_spans(task, {"messages": CONVERSATION}) == ["yo</s>", "chat</s>"]


def test_an_end_of_turn_eos_in_the_template_is_not_doubled_and_the_last_turn_stops_there():
    # (transformers renders templates with trim_blocks: a newline right after a block tag is dropped)
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
        "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    task = make_task(template, max_length=200)
    assert trained_spans(task, {"messages": CONVERSATION[1:]}) == ["yo</s>\n", "chat</s>"]


def test_system_prompt_is_added_where_the_conversation_has_none():
    task = make_task(CHAT_TEMPLATE, max_length=200)
    task.data.system_prompt = "you translate"
    text = task.tokenizer.decode(task.encode({"prompt": "cat", "response": "chat"})[0])
    assert text.startswith("<s>system: you translate\n<s>user: cat")
    own = task.tokenizer.decode(task.encode({"messages": CONVERSATION})[0])
    assert "you translate" not in own and own.startswith("<s>system: be brief")


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix():
    # drops every answer but the last one: rendering turn by turn is impossible
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: "
        "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    task = make_task(template, max_length=200)
    with pytest.raises(ConfigError, match="data.chat_template"):
        task.encode({"messages": CONVERSATION})


def test_the_padded_batch_loss_equals_the_mean_over_answer_tokens():
    task = make_task(CHAT_TEMPLATE, max_length=200)
    model = tiny_llama(len(task.tokenizer))
    examples = [{"messages": CONVERSATION}, {"prompt": "dog", "response": "chien"}]
    total, count = 0.0, 0
    for example in examples:
        ids, labels = task.encode(example)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE:
                total -= logp[t - 1, ids[t]].item()
                count += 1
    with torch.no_grad():
        assert task.loss(model, task.collate(examples)).item() == pytest.approx(total / count, rel=1e-5)


# -- chat_template from the config -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    tiny_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_override_inline_or_from_a_file(model_dir, tmp_path, as_file):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    value = template
    if as_file:
        (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
        value = str(tmp_path / "t.jinja")
    task = CausalLMTask(model=ModelConfig(name_or_path=str(model_dir)), data=DataConfig(chat_template=value))
    assert task.tokenizer is None
    assert task._load_tokenizer().decode(task.encode_prompt("cat")) == "[user] cat\n[assistant] "


def test_a_bad_chat_template_is_a_config_error_at_load(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "task: causal-lm\ndata: {name: freedict_eng_fra, chat_template: missing.jinja}\n", encoding="utf-8"
    )
    with pytest.raises(
        ConfigError,
        match=r"data.chat_template: 'missing.jinja' is neither a template .* nor an existing file",
    ):
        load_config(config)
    config.write_text(
        "task: causal-lm\ndata: {name: freedict_eng_fra, chat_template: '{% for m in messages %}'}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="data.chat_template: not a valid Jinja template"):
        load_config(config)


# -- generation settings ---------------------------------------------------------------------------


def test_generation_defaults_are_greedy_and_settings_reach_the_generation_config():
    task = make_task(None)
    model = tiny_llama(len(task.tokenizer))
    greedy = generation_config(settings_of(task.generation, task.eval), model, task.tokenizer, 0)
    assert (
        greedy.do_sample is False and greedy.num_beams == 1 and greedy.max_new_tokens == 8
    )  # eval.max_new_tokens=8
    settings = GenerationSettings(
        max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, num_beams=2, repetition_penalty=1.3
    )
    sampled = generation_config(settings, model, task.tokenizer, 0)
    assert (
        sampled.do_sample,
        sampled.temperature,
        sampled.top_p,
        sampled.top_k,
        sampled.num_beams,
        sampled.repetition_penalty,
        sampled.max_new_tokens,
    ) == (True, 0.7, 0.9, 20, 2, 1.3, 5)
    assert generation_config(GenerationSettings(temperature=0.0), model, task.tokenizer, 0).do_sample is False


def test_sampling_repeats_with_its_seed_and_leaves_the_global_random_state_alone():
    task = make_task(None)
    model = tiny_llama(len(task.tokenizer), seed=3)
    task.eval.max_new_tokens = None
    task.generation = GenerationSettings(max_new_tokens=12, temperature=1.5, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = task.predict(model, ["cat", "dog"], batch_size=2)
    assert torch.rand(1) == before  # the caller's random numbers are untouched
    assert task.predict(model, ["cat", "dog"], batch_size=2) == first
    task.generation = GenerationSettings(max_new_tokens=12)
    assert task.predict(model, ["cat", "dog"], batch_size=2) != first  # greedy differs from a hot sample


def test_the_older_eval_max_new_tokens_is_read_and_a_conflict_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "task: causal-lm\ndata: {name: freedict_eng_fra}\neval: {max_new_tokens: 9}\n", encoding="utf-8"
    )
    loaded = load_config(config)
    assert loaded.generation.max_new_tokens == 9 and loaded.eval.max_new_tokens is None  # moved at load
    # a run directory written before the generation section: an override of either spelling wins
    assert load_config(config, ["generation.max_new_tokens=64"]).generation.max_new_tokens == 64
    config.write_text(
        "task: causal-lm\ndata: {name: freedict_eng_fra}\ngeneration: {max_new_tokens: 12}\n",
        encoding="utf-8",
    )
    assert load_config(config, ["eval.max_new_tokens=5"]).generation.max_new_tokens == 5
    for generation in (12, 32):  # 32 is the default: given explicitly, it still disagrees
        config.write_text(
            "task: causal-lm\ndata: {name: freedict_eng_fra}\neval: {max_new_tokens: 9}\n"
            f"generation: {{max_new_tokens: {generation}}}\n",
            encoding="utf-8",
        )
        with pytest.raises(
            ConfigError,
            match=f"eval.max_new_tokens: 9 disagrees with generation.max_new_tokens: {generation}",
        ):
            load_config(config)
    config.write_text(
        "task: causal-lm\ndata: {name: freedict_eng_fra}\ngeneration: {top_p: 1.5, num_beams: 0}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "generation.top_p" in str(info.value) and "generation.num_beams" in str(info.value)


# -- a trained chat run: predict, --stream, peftkit chat --------------------------------------------


@pytest.fixture(scope="module")
def chat_run(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-run")
    # two exchanges in either order: the answer depends on the last user turn only
    turns = [
        [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
        [{"from": "human", "value": "bye"}, {"from": "gpt", "value": "ok"}],
    ]
    rows = [{"conversations": turns[i % 2] + turns[1 - i % 2]} for i in range(24)] + [
        {"conversations": t} for t in turns * 4
    ]
    data = write_jsonl(root / "sharegpt.jsonl", rows)
    config = RunConfig(
        task="causal-lm",
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(files=str(data), max_length=64, system_prompt="short answers"),
        adapter={
            "method": "lora",
            "r": 4,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        output_dir=str(root / "run"),
    )
    # learnt exactly from 60 steps on; 100 leave a margin
    config.train.steps, config.train.batch_size, config.train.lr = 100, 8, 2e-2
    config.train.progress = config.train.tensorboard = False
    config.generation.max_new_tokens = 6
    train_run(config, log=lambda line: None)
    return root / "run"


def test_a_sharegpt_run_learns_its_answers_and_predicts_from_a_messages_input(chat_run):
    answers = predict_run(
        chat_run,
        [
            {"messages": [{"role": "user", "content": "hi"}]},
            "bye",
            {
                "conversations": [
                    {"from": "human", "value": "bye"},
                    {"from": "gpt", "value": "ok"},
                    {"from": "human", "value": "hi"},
                ]
            },
        ],
    )
    assert answers == ["yo", "ok", "yo"]
    assert predict_run(chat_run, ["hi"], generation={"max_new_tokens": 1}) == ["y"]


def test_predict_stream_prints_the_answer_as_it_comes(chat_run, capsys):
    code = main(
        ["predict", str(chat_run), str(write_jsonl(chat_run.parent / "one.jsonl", ["hi"])), "--stream"]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0 and lines == ["yo", '"yo"']  # streamed, then the JSON line
    code = main(
        ["predict", str(chat_run), str(write_jsonl(chat_run.parent / "two.jsonl", ["a", "b"])), "--stream"]
    )
    assert code == 2 and "--stream shows one answer" in capsys.readouterr().err


def test_chat_keeps_the_history_and_resets(chat_run):
    lines = iter(["hi", "bye", "/reset", "bye", "/exit", "never read"])
    shown: list[str] = []
    history = chat_session(str(chat_run), read=lambda prompt: next(lines), write=shown.append)
    assert shown == ["yo", "ok", "(new conversation)", "ok"]
    assert history == [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]


def test_chat_command_reads_a_pipe_and_refuses_other_tasks(
    chat_run, monkeypatch, capsys, tiny_classification_run
):
    monkeypatch.setattr("sys.stdin", io.StringIO("bye\nhi\n"))
    assert main(["chat", str(chat_run), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ok", "yo"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(tiny_classification_run)]) == 2
    assert "peftkit chat talks to causal-lm runs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_classification_run(tiny_model_dir, reviews_csv, tmp_path_factory):  # noqa: F811
    from peftkit.run import runner
    from support.runs import make_config

    out = tmp_path_factory.mktemp("runs") / "classify"
    assert runner.train_run(
        make_config(tiny_model_dir, reviews_csv, out, train={"steps": 1}), log=lambda line: None
    ).ok
    return out


def test_chat_fields_on_another_task_are_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "task: text-classification\ndata: {name: rotten_tomatoes, system_prompt: be nice}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match="data.system_prompt: only causal-lm runs read it"):
        load_config(config)


@pytest.mark.parametrize(
    "row", [{"messages": CONVERSATION}, SHAREGPT, ALPACA], ids=["messages", "sharegpt", "alpaca"]
)
def test_each_layout_trains_the_tiny_model_on_its_answers_only(tmp_path, row):
    path = write_jsonl(tmp_path / "chat.jsonl", [row] * 8)
    task = make_task(CHAT_TEMPLATE, max_length=200)
    task.data.files = str(path)
    examples = task.load_data()["train"]
    answers = [m["content"] for m in examples[0]["messages"] if m["role"] == "assistant"]
    assert trained_spans(task, examples[0]) == [f"{a}\n</s>" for a in answers]
    model = tiny_llama(len(task.tokenizer))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = task.collate(examples[:4])
    first = task.loss(model, batch)
    first.backward()
    optimizer.step()
    assert task.loss(model, batch).item() < first.item()


def test_a_line_ending_in_a_backslash_continues_the_message(chat_run, monkeypatch):
    from peftkit.tasks.causal_lm import CausalLMTask as Task

    seen = []
    original = Task.predict

    def spy(self, model, inputs, batch_size, **kwargs):
        seen.append(inputs[0]["messages"][-1]["content"])
        return original(self, model, inputs, batch_size, **kwargs)

    monkeypatch.setattr(Task, "predict", spy)
    lines = iter(["two\\", "lines", "hi", "/exit"])
    chat_session(str(chat_run), read=lambda prompt: next(lines), write=lambda text: None)
    assert seen == ["two\nlines", "hi"]


def test_turns_after_the_last_answer_are_neither_trained_nor_scored():
    task = make_task(CHAT_TEMPLATE, max_length=200)
    trailing = {"messages": CONVERSATION + [{"role": "user", "content": "and dog?"}]}
    assert task.encode(trailing) == task.encode({"messages": CONVERSATION})
    assert task.reference_text(trailing) == "chat"
    # predicting continues the conversation: the trailing question is what gets answered
    assert task.tokenizer.decode(task.encode_prompt(trailing)).endswith("<s>user: and dog?\n<s>assistant: ")


def test_a_template_that_refuses_the_data_stops_the_run_before_anything_is_written(model_dir, tmp_path):
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 10)
    config = RunConfig(
        task="causal-lm",
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(files=str(data), chat_template=refusing),
        adapter={"method": "lora", "r": 2, "target_modules": ["q_proj"]},
        output_dir=str(tmp_path / "run"),
    )
    config.train.progress = config.train.tensorboard = False
    with pytest.raises(ConfigError, match="System role not supported"):
        train_run(config, log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_chat_drops_whole_old_exchanges_when_the_history_outgrows_the_context(chat_run):
    from peftkit.run.chat import _fitting
    from peftkit.run.runner import load_run

    task = load_run(chat_run).task
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 6 + [
        {"role": "user", "content": "bye"}
    ]
    limit = len(task.encode_prompt({"messages": history[-3:]}))
    kept = _fitting(task, history, limit)
    assert kept == history[-3:]  # the newest exchange and question; the system prompt is re-added whole
    assert task.tokenizer.decode(task.encode_prompt({"messages": kept})).startswith(
        "<s>system: short answers"
    )
