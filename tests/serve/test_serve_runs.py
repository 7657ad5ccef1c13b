"""`peftkit serve` on trained runs: a run as BASE serves its base and its adapter, another run joins as an
adapter, each answers with its own head and labels, equal to `peftkit predict` on that run."""

from __future__ import annotations

import httpx
import pytest

from peftkit.run.runner import predict_run, train_run
from peftkit.serve.server import ServerOptions, build_server, parse_adapter
from support.runs import make_config
from support.serving import serving

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TEXTS = ["the film was good", "dull and clumsy plot", "a very fun movie", "awful"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, reviews_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for name, seed in [("first", 0), ("second", 1)]:
        train_run(
            make_config(tiny_model_dir, reviews_csv, out / name, train={"seed": seed}), log=lambda line: None
        )
    return out


def test_runs_serve_their_own_heads_and_labels(runs, tiny_model_dir):
    built = build_server(
        ServerOptions(base=str(runs / "first"), adapters=[str(runs / "second")]), log=lambda line: None
    )
    assert built.base.id == str(tiny_model_dir) and built.base.kind == "classify"
    with serving(built.app) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        replies = {
            name: httpx.post(f"{url}/v1/classify", json={"model": name, "input": TEXTS}).json()
            for name in ("first", "second")
        }
    assert [m["id"] for m in models] == [str(tiny_model_dir), "first", "second"]
    for name, reply in replies.items():
        expected = predict_run(runs / name, TEXTS)
        assert [row["label"] for row in reply["data"]] == [p["label"] for p in expected], name
        assert {row["num_classes"] for row in reply["data"]} == {2}
        assert {row["label"] for row in reply["data"]} <= {
            "neg",
            "pos",
        }  # the run's labels, from metrics.json
    assert replies["first"]["data"] != replies["second"]["data"]  # two heads, really routed


def test_a_run_given_a_task_it_is_not_is_refused(runs):
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="--task causal-lm: the run in .* is a text-classification run"):
        build_server(ServerOptions(base=str(runs / "first"), task="causal-lm"), log=lambda line: None)


def test_adapter_specs():
    assert parse_adapter("a=runs/x") == ("a", "runs/x")
    assert parse_adapter("runs/support-lora/") == ("support-lora", "runs/support-lora/")
    assert parse_adapter("v1.2=dir=with=equals") == ("v1.2", "dir=with=equals")


def test_the_base_runs_adapter_can_be_named(runs):
    built = build_server(
        ServerOptions(base=str(runs / "first"), adapters=[f"sentiment={runs / 'first'}"]),
        log=lambda line: None,
    )
    assert [a.name for a in built.pool.available()] == ["sentiment"]
