"""Data sets from the Hugging Face Hub by name (``data.hub``), read offline from a real ``datasets`` cache.

No test here touches the network: the cache tests build the folders a Hub download leaves behind
and forbid every socket connection, and the not-cached tests answer the one probe locally.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest

from peftkit.data import hub
from peftkit.data.files import split_rows
from peftkit.errors import ConfigError
from peftkit.run.config import parse_config
from peftkit.run.schema import DataConfig, SplitConfig

REVISION = "0123456789abcdef0123456789abcdef01234567"  # the Hub commit a download is cached under
TRAIN = [{"text": f"tweet {i}", "label": i % 2} for i in range(20)]
DEV = [{"text": f"dev tweet {i}", "label": i % 2} for i in range(4)]


def cache_hub_data_set(cache: Path, repo: str, config: str, splits: dict[str, list[dict]]) -> Path:
    """Lay ``repo`` out in the ``datasets`` cache folder ``cache`` as a download from the Hub does.

    A download lands in ``<cache>/<owner>___<name>/<config>/<version>/<commit>/`` (``dataset_info.json``
    and one ``<name>-<split>.arrow`` per split), which is where ``datasets`` looks offline. It is built
    here by the JSON builder ``datasets`` uses for a Hub repository of JSON files; the builder refuses
    local files when given the repository id, so it builds under ``<name>`` and the folder is moved.
    """
    from datasets import ClassLabel, Features, Value
    from datasets.packaged_modules.json.json import Json

    *owner, name = repo.split("/")
    sources = cache.parent / f"sources-{name}-{config}"
    sources.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(sources / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stage = cache.parent / f"stage-{name}-{config}"
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    builder = Json(
        cache_dir=str(stage),
        dataset_name=name,
        config_name=config,
        config_id=config,
        hash=REVISION,
        data_files=files,
        features=features,
    )
    builder.download_and_prepare()
    target = cache / "___".join([*owner, name]) / config
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage / name / config), str(target))
    return target


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ``datasets`` cache folder that ``HF_DATASETS_CACHE`` points to, offline flags unset."""
    import datasets.config

    folder = tmp_path / "hf-datasets"
    folder.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(folder))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to resolve a host name or open a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network call was attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def by_text(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["text"])


# -- reading from the cache ------------------------------------------------------------------------


def test_a_cached_data_set_is_read_offline_with_hub_splits_and_a_seeded_test_cut(cache, no_network):
    cache_hub_data_set(cache, "someowner/tweets", "default", {"train": TRAIN, "dev": DEV})
    data = DataConfig(
        hub="someowner/tweets", hub_splits={"validation": "dev"}, split=SplitConfig(0.1, 0.25, seed=3)
    )

    columns, rows, info = hub.read_hub(data)

    assert columns == ["text", "label"]
    assert set(rows) == {"train", "validation", "test"}
    assert by_text(rows["validation"]) == by_text(DEV)
    # the test split is cut from train exactly as a single local file would be
    expected = split_rows(TRAIN, 0.0, 0.25, 3)
    assert rows["test"] == expected["test"] and rows["train"] == expected["train"]
    assert len(rows["test"]) == 5 and by_text(rows["train"] + rows["test"]) == by_text(TRAIN)
    assert info["source"] == "hub" and info["name"] == "someowner/tweets" and info["config"] == "default"
    assert info["revision"] == REVISION and info["loaded_from"] == "cache" and info["cache_dir"] == str(cache)
    assert info["hub_splits"] == {"train": "train", "validation": "dev"}
    assert info["hub_split_rows"] == {"train": 20, "dev": 4}
    assert info["cut_from_train"] == ["test"] and info["fractions"] == {"test": 0.25} and info["seed"] == 3
    assert info["class_names"] == {"label": ["negative", "positive"]}
    assert all(info["fingerprints"].values())


def test_the_seed_fixes_the_order_and_limits_keep_the_first_rows_after_shuffling(cache, no_network):
    cache_hub_data_set(cache, "someowner/tweets", "default", {"train": TRAIN, "test": DEV})

    def read(seed, **limits):
        return hub.read_hub(
            DataConfig(hub="someowner/tweets", split=SplitConfig(0.2, 0.1, seed=seed), **limits)
        )[1]

    assert read(0) == read(0)
    assert read(0)["train"] != read(1)["train"]
    limited = read(0, max_train_examples=3, max_eval_examples=2)
    assert {s: len(v) for s, v in limited.items()} == {"train": 3, "validation": 2, "test": 2}
    assert all(limited[s] == read(0)[s][: len(limited[s])] for s in limited)


def test_name_slash_config_and_colon_config_read_a_cached_config(cache, no_network):
    cache_hub_data_set(cache, "glue", "sst2", {"train": TRAIN, "validation": DEV})
    cache_hub_data_set(cache, "glue", "cola", {"train": TRAIN[:6], "validation": DEV})

    for name in ("glue/sst2", "glue:sst2"):
        _, rows, info = hub.read_hub(DataConfig(hub=name))
        assert (info["name"], info["config"], info["hub_splits"]) == (
            "glue",
            "sst2",
            {"train": "train", "validation": "validation"},
        )
        assert by_text(rows["validation"]) == by_text(DEV) and len(rows["train"]) + len(rows["test"]) == 20
    assert hub.read_hub(DataConfig(hub="glue:cola"))[2]["hub_split_rows"]["train"] == 6

    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="glue"))
    assert "data.hub: 'glue' has several configs in the cache" in str(error.value)
    assert "(cola, sst2); name one, e.g. 'glue:cola'" in str(error.value)


def test_owner_slash_name_wins_over_name_slash_config_when_both_are_cached(cache, no_network):
    cache_hub_data_set(cache, "glue", "sst2", {"train": TRAIN})
    cache_hub_data_set(cache, "glue/sst2", "default", {"train": TRAIN[:5]})

    assert hub.read_hub(DataConfig(hub="glue/sst2"))[2]["name"] == "glue/sst2"
    assert hub.read_hub(DataConfig(hub="glue:sst2"))[2]["name"] == "glue"


def test_an_unknown_hub_split_lists_the_splits_there_are(cache, no_network):
    cache_hub_data_set(cache, "someowner/tweets", "default", {"train": TRAIN, "dev": DEV})

    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="someowner/tweets", hub_splits={"validation": "valid"}))
    assert (
        "data.hub_splits.validation: 'someowner/tweets' (default) has no split 'valid'; its splits: train, dev"
        in str(error.value)
    )
    cache_hub_data_set(cache, "someowner/devonly", "default", {"dev": DEV})
    with pytest.raises(
        ConfigError,
        match="data.hub_splits.train: nothing to train on: .* has the splits dev, and "
        "it has no split 'train'; set data.hub_splits.train",
    ):
        hub.read_hub(DataConfig(hub="someowner/devonly"))
    with pytest.raises(ConfigError, match="its split 'train' already feeds another split"):
        hub.read_hub(DataConfig(hub="someowner/tweets", hub_splits={"test": "train"}))


# -- not in the cache ------------------------------------------------------------------------------


def test_not_cached_in_offline_mode_fails_without_any_network_call(cache, no_network, monkeypatch):
    cache_hub_data_set(cache, "someowner/tweets", "default", {"train": TRAIN})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="someowner/tweets:other"))
    (problem,) = error.value.problems
    assert problem.startswith(
        f"data.hub: data set 'someowner/tweets' with config 'other' is not in the local "
        f"datasets cache at {cache} (the cache holds other configs: someowner/tweets has default)"
    )
    assert "offline mode is on (HF_HUB_OFFLINE)" in problem
    assert "set HF_DATASETS_CACHE to a folder that holds it" in problem and "use data.files" in problem


def test_not_cached_without_a_network_fails_after_one_probe(cache, monkeypatch):
    import datasets
    import datasets.config
    import huggingface_hub.utils

    with socket.socket() as closed:  # a port nothing listens on: connecting is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    probes = []
    session = huggingface_hub.utils.get_session

    def counting_session():
        real = session()

        class Counting:
            def head(self, url, **kwargs):
                probes.append(url)
                return real.head(url, **kwargs)

        return Counting()

    def no_download(*args, **kwargs):
        raise AssertionError("datasets was asked to download after the probe failed")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", counting_session)
    monkeypatch.setattr(datasets, "load_dataset_builder", no_download)

    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="someowner/tweets"))
    (problem,) = error.value.problems
    assert probes == [f"http://127.0.0.1:{port}"]
    assert problem.startswith(
        "data.hub: data set 'someowner/tweets' or data set 'someowner' with config 'tweets' "
        f"is not in the local datasets cache at {cache}, and there is no network: "
        f"http://127.0.0.1:{port} gave no answer"
    )
    assert "ConnectError" in problem and "connect to the network once" in problem


def test_the_probe_gives_up_after_its_timeout_and_accepts_any_answer(cache, monkeypatch):
    import datasets.config

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
        reason = hub.offline_reason()
    assert reason is not None and "gave no answer within 0.2 s" in reason and "Timeout" in reason

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # even an error status means the Hub is there
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub.offline_reason() is None
    finally:
        server.shutdown()
        server.server_close()


# -- from the Hub (datasets' builder stood in for) -------------------------------------------------


class FakeBuilder:
    """What ``load_dataset_builder`` returns for a Hub data set, holding rows instead of downloading."""

    def __init__(self, config: str, splits: dict[str, list[dict]]) -> None:
        from datasets import Dataset, DatasetDict

        self.config = type("Config", (), {"name": config})()
        self.hash = REVISION
        self.dataset = DatasetDict({s: Dataset.from_list(rows) for s, rows in splits.items()})

    def download_and_prepare(self) -> None:
        pass

    def as_dataset(self):
        return self.dataset


def test_online_name_slash_config_tries_the_repository_first_then_the_config(cache, monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    asked = []

    def builder(repo, config=None, **kwargs):
        asked.append((repo, config))
        if repo == "glue/sst2":
            raise DatasetNotFoundError("Dataset 'glue/sst2' doesn't exist on the Hub or cannot be accessed.")
        if config != "sst2":
            raise ValueError(f"BuilderConfig '{config}' not found. Available: ['cola', 'sst2']")
        return FakeBuilder("sst2", {"train": TRAIN, "validation": DEV})

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset_builder", builder)

    columns, rows, info = hub.read_hub(DataConfig(hub="glue/sst2"))
    assert asked == [("glue/sst2", None), ("glue", "sst2")]
    assert columns == ["text", "label"] and by_text(rows["validation"]) == by_text(DEV)
    assert (info["name"], info["config"], info["revision"], info["loaded_from"]) == (
        "glue",
        "sst2",
        REVISION,
        "hub",
    )

    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="glue:sts"))
    assert (
        "data set 'glue' with config 'sts': BuilderConfig 'sts' not found. Available: ['cola', 'sst2']"
        in str(error.value)
    )
    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="nyu-mll/glue/x"))
    assert "data set 'nyu-mll/glue' with config 'x': BuilderConfig 'x' not found" in str(error.value)


def test_online_unknown_data_set_and_a_hub_that_stops_answering(cache, monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def missing(repo, config=None, **kwargs):
        raise DatasetNotFoundError(f"Dataset '{repo}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset_builder", missing)
    with pytest.raises(ConfigError) as error:
        hub.read_hub(DataConfig(hub="someone/nothing"))
    assert "data.hub: no Hub data set matches 'someone/nothing'" in str(error.value)
    assert "HF_TOKEN" in str(error.value)

    def unreachable(repo, config=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    with pytest.raises(
        ConfigError, match="is not in the local datasets cache at .* and the Hub did not answer"
    ):
        hub.read_hub(DataConfig(hub="someone/nothing"))


# -- configuration checks (no network) -------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "imdb",
        "stanfordnlp/sst2",
        "glue/sst2",
        "nyu-mll/glue/sst2",
        "glue:sst2",
        "nyu-mll/glue:sst2",
        "Salesforce/wikitext:wikitext-2-raw-v1",
        "cnn_dailymail:3.0.0",
    ],
)
def test_well_formed_names_have_no_problems(name):
    assert hub.config_problems(DataConfig(hub=name)) == []


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "",
            "data.hub: expected 'name', 'owner/name', 'name:config', 'owner/name:config' or 'owner/name/config' "
            "without spaces, got ''",
        ),
        (" imdb", "without spaces"),
        ("a/b/c/d", "(a Hub data set is 'name' or 'owner/name')"),
        ("a/b/c:d", "(a Hub data set is 'name' or 'owner/name')"),
        ("a:b:c", "(one ':' before the config name)"),
        ("imdb:", "(one ':' before the config name)"),
        (
            "https://huggingface.co/datasets/stanfordnlp/imdb",
            "give the data set's name, not a URL: 'stanfordnlp/imdb'",
        ),
        ("hf://datasets/stanfordnlp/imdb@main", "not a URL: 'stanfordnlp/imdb'"),
        ("./data/tweets", "looks like a local path; local files go in data.files"),
        ("owner/bad--name", "'bad--name' in 'owner/bad--name' is not a Hub name"),
        ("-owner/name", "'-owner' in '-owner/name' is not a Hub name"),
        ("glue:sst 2", "without spaces"),
        ("glue:sst$2", "'sst$2' in 'glue:sst$2' is not a config name"),
    ],
)
def test_malformed_names_say_what_is_expected(name, message):
    (problem,) = hub.config_problems(DataConfig(hub=name))
    assert problem.startswith("data.hub: ") and message in problem


def test_hub_splits_keys_values_and_one_hub_split_for_two_roles():
    problems = hub.config_problems(
        DataConfig(
            hub="imdb",
            hub_splits={"dev": "validation", "train": "train[:10%]", "validation": "test", "test": "test"},
        )
    )
    assert problems == [
        "data.hub_splits.dev: expected one of train, validation, test as the key (the peftkit split the Hub split feeds)",
        "data.hub_splits.train: expected the name of a split of the Hub data set, such as 'train', 'dev' or "
        "'validation_matched', got 'train[:10%]'; split slices are not read here, use data.max_train_examples / "
        "data.max_eval_examples",
        "data.hub_splits: validation and test both read the Hub split 'test'; keep one (a peftkit split with no Hub "
        "split is cut from the train split with data.split)",
    ]


def test_run_config_reports_hub_problems_with_the_rest():
    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "task": "text-classification",
                "model": {"name_or_path": "minilm"},
                "data": {"hub": "a/b/c/d", "hub_splits": {"dev": "x"}},
            }
        )
    paths = [p.split(":", 1)[0] for p in error.value.problems]
    assert "data.hub" in paths and "data.hub_splits.dev" in paths


def test_readings_in_the_order_they_are_tried():
    assert hub.readings("imdb") == [("imdb", None)]
    assert hub.readings("glue/sst2") == [("glue/sst2", None), ("glue", "sst2")]
    assert hub.readings("nyu-mll/glue/sst2") == [("nyu-mll/glue", "sst2")]
    assert hub.readings("nyu-mll/glue:sst2") == [("nyu-mll/glue", "sst2")]
    assert hub.readings("glue:sst2") == [("glue", "sst2")]


# -- a whole run from a cached Hub data set ---------------------------------------------------------


def test_a_run_trains_on_a_cached_hub_data_set_with_its_class_names(
    cache, no_network, tiny_model_dir, tmp_path
):  # noqa: F811
    from peftkit.run import runner
    from support.runs import make_config

    cache_hub_data_set(cache, "someowner/tweets", "default", {"train": TRAIN, "dev": DEV})
    config = make_config(
        tiny_model_dir,
        "unused.csv",
        tmp_path / "run",
        data={
            "files": None,
            "hub": "someowner/tweets",
            "hub_splits": {"validation": "dev"},
            "columns": {},
            "split": {"validation": 0.0, "test": 0.25, "seed": 0},
        },
    )
    result = runner.train_run(config, log=lambda line: None)
    assert result.ok
    info = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert info["source"] == "hub" and info["labels"] == ["negative", "positive"]
    assert info["sizes"] == {"train": 15, "validation": 4, "test": 5}
    [prediction] = runner.predict_run(tmp_path / "run", ["tweet 3"])
    assert prediction["label"] in ("negative", "positive")


def test_an_unlabelled_hub_split_and_reordered_labels_are_refused(
    cache, no_network, tiny_model_dir, tmp_path
):  # noqa: F811
    from peftkit.run import runner
    from support.runs import make_config

    # GLUE-style: the test split's labels are all -1 ("no label")
    unlabelled = [{"text": f"test tweet {i}", "label": -1} for i in range(4)]
    cache_hub_data_set(
        cache, "someowner/glue-like", "default", {"train": TRAIN, "dev": DEV, "test": unlabelled}
    )
    hub_data = {"files": None, "hub": "someowner/glue-like", "columns": {}}
    config = make_config(tiny_model_dir, "unused.csv", tmp_path / "run", data=hub_data)
    with pytest.raises(
        ConfigError, match=r"test split\(s\) of the Hub data set carry no labels .* data.hub_splits"
    ):
        runner.train_run(config, log=lambda line: None)
    config = make_config(
        tiny_model_dir,
        "unused.csv",
        tmp_path / "run2",
        data={**hub_data, "hub_splits": {"test": "dev"}, "labels": ["positive", "negative"]},
    )
    with pytest.raises(ConfigError, match="data.labels: .* another order than its ClassLabel"):
        runner.train_run(config, log=lambda line: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
