"""`peftkit serve` through the official `openai` client: the model list, completions and chat (streamed
and not), per-request adapters whose answers equal each adapter alone, runtime loading and unloading,
hostile adapters refused while the server goes on, auth, the queue bound, timeouts and strict bodies."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import peftkit
from peftkit.serve.server import ServerOptions, build_server
from support.serving import alone, base_and_adapters, serving

openai = pytest.importorskip("openai")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model_dir, adapters = base_and_adapters(tmp, NAMES)
    return tmp, model_dir, adapters


@pytest.fixture(scope="module")
def server(world):
    _, model_dir, adapters = world
    options = ServerOptions(
        base=str(model_dir),
        name="tiny",
        adapters=[f"alpha={adapters / 'alpha'}"],
        adapters_dir=str(adapters),
        max_adapters=4,
        max_batch=8,
    )
    built = build_server(options, log=lambda line: None)
    with serving(built.app) as url:
        yield built, url


def client(url: str, key: str = "unused", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kwargs)


def expected(world, server, name: str | None, prompt_ids: list[int], max_tokens: int) -> str:
    _, model_dir, adapters = world
    tokens = alone(model_dir, adapters / name if name else None, prompt_ids, max_tokens)
    tokenizer = server[0].base.tokenizer
    stops = server[0].base.stop_ids
    if any(t in stops for t in tokens):
        tokens = tokens[: next(i for i, t in enumerate(tokens) if t in stops)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


# -- the model list and one request of each kind ------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(server):
    built, url = server
    models = client(url).models.list().data
    assert [m.id for m in models] == ["tiny", *sorted(NAMES)]
    by_id = {m.id: m.model_dump() for m in models}
    assert by_id["tiny"]["parent"] is None and by_id["tiny"]["owned_by"] == "peftkit"
    assert by_id["beta"]["parent"] == "tiny" and by_id["beta"]["root"].endswith("beta")


@pytest.mark.parametrize("name", ["alpha", "gamma", None])
def test_completion_equals_the_adapter_alone(world, server, name):
    built, url = server
    reply = client(url).completions.create(
        model=name or "tiny", prompt="say cat", max_tokens=10, temperature=0
    )
    ids = built.base.encode_text("say cat")
    assert reply.choices[0].text == expected(world, server, name, ids, 10)
    assert reply.usage.prompt_tokens == len(ids) and reply.model == (name or "tiny")
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_adapters_answer_differently(server):
    _, url = server
    answers = {
        name: client(url)
        .completions.create(model=name, prompt="say sun", max_tokens=8, temperature=0)
        .choices[0]
        .text
        for name in ["tiny", *NAMES]
    }
    assert len(set(answers.values())) == len(answers), answers  # else the equality tests prove nothing


def test_chat_uses_the_chat_template(world, server):
    built, url = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say dog"}]
    reply = client(url).chat.completions.create(model="beta", messages=messages, max_tokens=9, temperature=0)
    ids = built.base.encode_chat(messages)
    assert built.base.tokenizer.decode(ids).startswith("<s>system: be brief\n<s>user: say dog\n<s>assistant:")
    assert reply.choices[0].message.content == expected(world, server, "beta", ids, 9)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"


def test_several_prompts_give_one_choice_each(world, server):
    built, url = server
    reply = client(url).completions.create(
        model="delta", prompt=["say a", "say bb"], max_tokens=6, temperature=0
    )
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [
        expected(world, server, "delta", built.base.encode_text(p), 6) for p in ["say a", "say bb"]
    ]


# -- streaming --------------------------------------------------------------------------------------


def test_streamed_completion_equals_the_whole_one(server):
    _, url = server
    api = client(url)
    whole = api.completions.create(model="gamma", prompt="say tree", max_tokens=12, temperature=0)
    chunks = list(
        api.completions.create(
            model="gamma",
            prompt="say tree",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did come in pieces


def test_streamed_chat_starts_with_the_role(server):
    _, url = server
    messages = [{"role": "user", "content": "say leaf"}]
    api = client(url)
    whole = api.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model="alpha", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# -- sampling fields --------------------------------------------------------------------------------


def test_a_seed_reproduces_a_sample_whatever_else_is_in_the_batch(server):
    _, url = server
    api = client(url)

    def sample() -> str:
        return (
            api.completions.create(
                model="beta", prompt="say sea", max_tokens=12, temperature=1.0, top_p=0.9, seed=7
            )
            .choices[0]
            .text
        )

    first = sample()
    with ThreadPoolExecutor(4) as pool:  # the same request again, now beside others
        noise = [
            pool.submit(api.completions.create, model=n, prompt="x", max_tokens=12, temperature=1.0)
            for n in NAMES
        ]
        again = sample()
        [f.result() for f in noise]
    assert again == first
    other = (
        api.completions.create(model="beta", prompt="say sea", max_tokens=12, temperature=1.0, seed=8)
        .choices[0]
        .text
    )
    assert other != first


def test_stop_sequences_cut_the_answer(server):
    _, url = server
    api = client(url)
    full = (
        api.completions.create(model="gamma", prompt="say rock", max_tokens=12, temperature=0).choices[0].text
    )
    stop = full[4:6]
    assert stop and full.find(stop) >= 0
    cut = api.completions.create(
        model="gamma", prompt="say rock", max_tokens=12, temperature=0, stop=[stop, "@@"]
    )
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = api.completions.create(
        model="gamma", prompt="say rock", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]


def test_max_tokens_ends_with_length(server):
    _, url = server
    reply = client(url).completions.create(model="alpha", prompt="say cat", max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


# -- strict bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "alpha", "prompt": "x", "max_token": 3}, "did you mean 'max_tokens'"),
        ({"model": "alpha", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "alpha", "prompt": "x", "n": 2}, "n: this server returns one choice"),
        ({"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
        ({"model": "alpha", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 100000}, "maximum context length is 256"),
        ({"prompt": "x"}, "model: Field required"),
        ({"model": "alpha", "prompt": ""}, "prompt: encodes to no tokens"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(server, body, message):
    _, url = server
    reply = httpx.post(f"{url}/v1/completions", json=body)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]


def test_unknown_model_lists_the_ones_served(server):
    _, url = server
    with pytest.raises(openai.NotFoundError, match="alpha, beta, delta, gamma"):
        client(url).completions.create(model="alpah", prompt="x")


def test_classify_on_a_generation_server_points_to_the_right_endpoint(server):
    _, url = server
    reply = httpx.post(f"{url}/v1/classify", json={"model": "alpha", "input": "x"})
    assert reply.status_code == 400 and "/v1/chat/completions" in reply.json()["error"]["message"]


def test_not_json_is_a_400(server):
    _, url = server
    reply = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


# -- many clients, many adapters ----------------------------------------------------------------------


def test_eight_clients_four_adapters_each_answer_is_its_adapters_alone(world, server):
    built, url = server
    prompts = [f"say {w}" for w in ["cat", "dog", "sun", "sea", "sky", "tree", "leaf", "rock"]]
    jobs = [
        (NAMES[(c + r) % 4], prompts[(3 * c + r) % 8], 6 + (c + r) % 5) for c in range(8) for r in range(4)
    ]

    def client_run(c: int) -> list[str]:
        api = client(url)
        return [
            api.completions.create(model=n, prompt=p, max_tokens=m, temperature=0).choices[0].text
            for n, p, m in jobs[4 * c : 4 * c + 4]
        ]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for part in pool.map(client_run, range(8)) for a in part]
    assert len(answers) == len(jobs)  # nothing dropped
    cache: dict = {}
    for (name, prompt, most), answer in zip(jobs, answers):
        key = (name, prompt, most)
        if key not in cache:
            cache[key] = expected(world, server, name, built.base.encode_text(prompt), most)
        assert answer == cache[key], key


# -- adapters at runtime ------------------------------------------------------------------------------


def test_load_and_unload_at_runtime(world, server):
    _, url = server
    tmp, _, adapters = world
    reply = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "beta-copy", "lora_path": str(adapters / "beta")}
    )
    assert reply.status_code == 200 and reply.text == "Success: LoRA adapter 'beta-copy' added successfully."
    api = client(url)
    assert "beta-copy" in [m.id for m in api.models.list().data]
    same = [
        api.completions.create(model=n, prompt="say sky", max_tokens=6, temperature=0).choices[0].text
        for n in ("beta", "beta-copy")
    ]
    assert same[0] == same[1]
    again = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "beta-copy", "lora_path": str(adapters / "beta")}
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    inplace = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "beta-copy", "lora_path": str(adapters / "gamma"), "load_inplace": True},
    )
    assert inplace.status_code == 200
    now = (
        api.completions.create(model="beta-copy", prompt="say sky", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    assert (
        now
        == api.completions.create(model="gamma", prompt="say sky", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta-copy"})
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'beta-copy' removed successfully."
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="beta-copy", prompt="x", max_tokens=2)
    missing = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta-copy"})
    assert missing.status_code == 404 and "cannot be found" in missing.json()["error"]["message"]


def test_runtime_loading_stays_inside_the_allowed_directories(world, server):
    _, url = server
    tmp, _, _ = world
    outside = tmp / "outside"
    shutil.copytree(tmp / "adapters" / "alpha", outside, dirs_exist_ok=True)
    for path in (outside, tmp / "adapters" / ".." / "outside"):
        reply = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": str(path)}
        )
        assert reply.status_code == 403 and "outside the directories" in reply.json()["error"]["message"]
    bad_name = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "../x", "lora_path": str(tmp / "adapters" / "alpha")},
    )
    assert bad_name.status_code == 400 and "not allowed" in bad_name.json()["error"]["message"]
    base_name = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "tiny", "lora_path": str(tmp / "adapters" / "alpha")},
    )
    assert base_name.status_code == 400 and "base model's name" in base_name.json()["error"]["message"]


def _hostile(adapters, tmp):
    """Adapter directories a server must refuse, each in its own way (name -> what the refusal says)."""
    from support.generation import tiny_llama

    cases = {}
    wrong = tiny_llama(vocab_size=80)  # another vocabulary: embedding shapes differ
    wrong.config.hidden_size = 32
    peftkit.inject(wrong, peftkit.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    peftkit.save_adapter(wrong, adapters / "other-base")
    cases["other-base"] = "refused"
    pickled = adapters / "pickled"
    shutil.copytree(adapters / "alpha", pickled)
    (pickled / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp / "pwned"), "w"))

    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    cases["pickled"] = "pickle"
    truncated = adapters / "truncated"
    shutil.copytree(adapters / "alpha", truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = "refused"
    garbage = adapters / "garbage-config"
    shutil.copytree(adapters / "alpha", garbage)
    (garbage / "adapter_config.json").write_text("{not json")
    cases["garbage-config"] = "refused"
    prompt = adapters / "soft-prompt"
    model = tiny_llama(
        vocab_size=len(json.loads((tmp / "llama" / "tokenizer.json").read_text())["model"]["vocab"])
    )
    peftkit.inject(model, peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    peftkit.save_adapter(model, prompt)
    cases["soft-prompt"] = "per-request routing"
    return cases


def test_hostile_adapters_are_refused_while_other_requests_succeed(world, server):
    built, url = server
    tmp, _, adapters = world
    cases = _hostile(adapters, tmp)
    api = client(url)
    good = (
        api.completions.create(model="alpha", prompt="say cat", max_tokens=8, temperature=0).choices[0].text
    )
    stop = threading.Event()
    results: list[str] = []

    def keep_asking() -> None:
        while not stop.is_set():
            results.append(
                api.completions.create(model="alpha", prompt="say cat", max_tokens=8, temperature=0)
                .choices[0]
                .text
            )

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        for name, says in cases.items():
            with pytest.raises(openai.APIStatusError) as refused:  # found in --adapters-dir, loaded on use
                api.completions.create(model=name, prompt="x", max_tokens=2)
            assert 400 <= refused.value.status_code < 500 and says in str(refused.value), (
                name,
                refused.value,
            )
            reply = httpx.post(
                f"{url}/v1/load_lora_adapter",
                json={"lora_name": f"{name}-2", "lora_path": str(adapters / name)},
            )
            assert 400 <= reply.status_code < 500 and says in reply.json()["error"]["message"], (
                name,
                reply.text,
            )
    finally:
        stop.set()
        worker.join()
    assert results and set(results) == {good}
    assert not (tmp / "pwned").exists()
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    for name in cases:
        shutil.rmtree(adapters / name)  # other tests list the adapters directory


# -- auth, queue bound, timeouts ----------------------------------------------------------------------


@pytest.fixture()
def small_server(world):
    """A fresh server per test, built with the options the test gives."""
    _, model_dir, adapters = world
    started = []

    def start(**options):
        built = build_server(
            ServerOptions(base=str(model_dir), name="tiny", adapters_dir=str(adapters), **options),
            log=lambda line: None,
        )
        context = serving(built.app)
        url = context.__enter__()
        started.append(context)
        return built, url

    yield start
    for context in started:
        context.__exit__(None, None, None)


def test_an_api_key_guards_every_endpoint_but_health(small_server):
    _, url = small_server(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer"):
        client(url, key="wrong").models.list()
    for path, body in [
        ("/v1/models", None),
        ("/v1/completions", {"model": "tiny", "prompt": "x"}),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/"}),
        ("/v1/unload_lora_adapter", {"lora_name": "alpha"}),
    ]:
        reply = httpx.request("POST" if body else "GET", f"{url}{path}", json=body)
        assert reply.status_code == 401, path
    assert [m.id for m in client(url, key="s3cret").models.list().data][0] == "tiny"
    assert httpx.get(f"{url}/health").status_code == 200


def _slow(built, seconds: float) -> None:
    step = built.engine.batch.step

    def slow_step(routing):
        time.sleep(seconds)
        step(routing)

    built.engine.batch.step = slow_step


def test_a_full_queue_answers_429_and_the_server_goes_on(small_server):
    built, url = small_server(max_queue=1)
    _slow(built, 0.05)
    api = client(url)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            api.completions.create, model="alpha", prompt="say cat", max_tokens=20, temperature=0
        )
        while built.engine.load == 0:
            time.sleep(0.005)
        with pytest.raises(openai.RateLimitError, match="--max-queue is 1"):
            api.completions.create(model="beta", prompt="say dog", max_tokens=2)
        assert first.result().usage.completion_tokens == 20
    assert (
        api.completions.create(
            model="beta", prompt="say dog", max_tokens=2, temperature=0
        ).usage.completion_tokens
        == 2
    )


def test_a_request_past_its_timeout_gets_504_and_frees_its_row(small_server):
    built, url = small_server(request_timeout=0.5)
    _slow(built, 0.05)
    api = client(url)
    with pytest.raises(openai.APIStatusError, match="--request-timeout") as late:
        api.completions.create(model="alpha", prompt="say cat", max_tokens=200, temperature=0)
    assert late.value.status_code == 504
    deadline = time.monotonic() + 5
    while built.engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert built.engine.load == 0
    assert (
        api.completions.create(
            model="alpha", prompt="say cat", max_tokens=2, temperature=0
        ).usage.completion_tokens
        == 2
    )


def test_a_client_that_goes_away_frees_its_row(small_server):
    built, url = small_server()
    _slow(built, 0.02)
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "beta", "prompt": "x", "max_tokens": 200, "stream": True},
    ) as reply:
        next(reply.iter_lines())
    deadline = time.monotonic() + 5
    while built.engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert built.engine.load == 0 and built.pool.get("beta").in_use == 0


def test_least_recently_used_adapters_make_room(world, small_server):
    built, url = small_server(max_adapters=2)
    api = client(url)
    for name in NAMES + NAMES[:2]:
        api.completions.create(model=name, prompt="say cat", max_tokens=2, temperature=0)
        resident = [a.name for a in built.pool.resident()]
        assert len(resident) <= 2 and name in resident
    assert len(peftkit.adapter_names(built.base.model)) == 2
    with ThreadPoolExecutor(4) as pool:  # four adapters at once through two slots: they take turns
        texts = list(
            pool.map(
                lambda n: (
                    api.completions.create(model=n, prompt="say sun", max_tokens=5, temperature=0)
                    .choices[0]
                    .text
                ),
                NAMES,
            )
        )
    ids = built.base.encode_text("say sun")
    assert texts == [expected(world, (built, url), n, ids, 5) for n in NAMES]


def test_unloading_an_adapter_in_use_lets_its_request_finish(small_server):
    built, url = small_server()
    _slow(built, 0.02)
    api = client(url)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            api.completions.create, model="gamma", prompt="say sea", max_tokens=30, temperature=0
        )
        while not getattr(built.pool.get("gamma"), "in_use", 0):
            time.sleep(0.005)
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
        assert running.result().usage.completion_tokens == 30
    assert built.pool.get("gamma") is None
    assert len(peftkit.adapter_names(built.base.model)) == 0  # it left with its last request


def test_a_failing_forward_fails_its_requests_not_the_server(small_server):
    built, url = small_server()
    original = built.engine.batch.admit
    calls = []

    def broken(rows, routing):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return original(rows, routing)

    built.engine.batch.admit = broken
    api = client(url)
    with pytest.raises(openai.InternalServerError):
        api.completions.create(model="alpha", prompt="say cat", max_tokens=3)
    assert (
        api.completions.create(
            model="alpha", prompt="say cat", max_tokens=3, temperature=0
        ).usage.completion_tokens
        == 3
    )


def test_classification_batches_adapters_with_their_own_heads(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "the", "was"]
    base_dir = tmp_path / "bert"
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(base_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "neg", 1: "meh", 2: "pos"},
        label2id={"neg": 0, "meh": 1, "pos": 2},
    )
    BertForSequenceClassification(config).save_pretrained(base_dir)
    for i, name in enumerate(["one", "two"]):
        model = BertForSequenceClassification.from_pretrained(base_dir)
        torch.manual_seed(10 + i)
        peftkit.inject(
            model,
            peftkit.LoraConfig(
                r=4,
                target_modules=["query", "value"],
                modules_to_save=["classifier"],
                init_lora_weights=False,
            ),
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "classifier" in n and p.requires_grad:
                    p.normal_(0, 1)
        peftkit.save_adapter(model, tmp_path / "adapters" / name)
    built = build_server(
        ServerOptions(
            base=str(base_dir),
            task="text-classification",
            name="bert",
            adapters_dir=str(tmp_path / "adapters"),
        ),
        log=lambda line: None,
    )
    texts = ["the film was good", "bad", "the the film", "good good bad"]
    with serving(built.app) as url:
        with ThreadPoolExecutor(3) as pool:
            replies = list(
                pool.map(
                    lambda n: httpx.post(f"{url}/v1/classify", json={"model": n, "input": texts}).json(),
                    ["one", "two", "bert"],
                )
            )
        single = httpx.post(f"{url}/classify", json={"model": "one", "input": "bad"}).json()
        wrong = httpx.post(f"{url}/v1/completions", json={"model": "one", "prompt": "x"})
    assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]
    for name, reply in zip(["one", "two", "bert"], replies):
        model = BertForSequenceClassification.from_pretrained(base_dir).eval()
        if name != "bert":
            peftkit.load_adapter(model, tmp_path / "adapters" / name)
        batch = BertTokenizer.from_pretrained(base_dir)(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**batch).logits, -1)
        got = torch.tensor([row["probs"] for row in reply["data"]])
        torch.testing.assert_close(got, probs, atol=1e-5, rtol=0)
        assert [row["label"] for row in reply["data"]] == [["neg", "meh", "pos"][i] for i in probs.argmax(-1)]
        assert [row["index"] for row in reply["data"]] == [0, 1, 2, 3] and reply["model"] == name
    assert single["data"][0]["probs"] == replies[0]["data"][1]["probs"]
