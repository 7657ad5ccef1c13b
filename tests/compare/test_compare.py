"""`peftkit compare`: the comparison config, the run plan, idempotent records, failures, and the report's
numbers checked against the records. End to end on a tiny BERT and a CSV file (see test_runner.py)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys

import pytest

from peftkit.cli import main
from peftkit.compare import load_compare_config, parse_compare_config, read_record, run_comparison
from peftkit.compare import runner as compare_runner
from peftkit.errors import ConfigError
from peftkit.report import summarise
from peftkit.report.render import COLUMNS, cells

DEMO = "src/peftkit/compare/demo-sentiment-minilm.yaml"


def comparison(model_dir, csv_path, out, runs=None, **compare):
    return {
        "task": "text-classification",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "files": str(csv_path),
            "columns": {"text": "review", "label": "sentiment"},
            "max_length": 16,
            "split": {"validation": 0.2, "test": 0.2, "seed": 0},
        },
        "train": {
            "steps": 6,
            "batch_size": 8,
            "lr": 1e-2,
            "eval_every": 3,
            "metric": "accuracy",
            "greater_is_better": True,
            "log_every": 3,
            "progress": False,
            "tensorboard": False,
            "device": "cpu",
        },
        "eval": {"batch_size": 8},
        "output_dir": str(out),
        "compare": {
            "seeds": 2,
            "probe_examples": 12,
            "latency_repeats": 2,
            **compare,
            "runs": runs
            or [
                {"name": "full", "adapter": {"method": "full"}, "train": {"lr": 1e-3}},
                {"name": "lora", "adapter": {"method": "lora", "r": 4, "target_modules": ["query", "value"]}},
            ],
        },
    }


# -- the config ------------------------------------------------------------------------------------


def test_runs_merge_their_sections_into_the_shared_ones(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    config = parse_compare_config(comparison(tiny_model_dir, reviews_csv, tmp_path / "c"))
    assert config.names == ["full", "lora"] and config.seeds == [0, 1]
    assert [r.label for r in config.runs] == ["full seed 0", "full seed 1", "lora seed 0", "lora seed 1"]
    full, lora = config.runs[0].config, config.runs[2].config
    assert full.adapter == {"method": "full"} and full.train.lr == 1e-3
    assert lora.train.lr == 1e-2 and lora.train.steps == 6  # unchanged shared values stay
    assert lora.adapter["r"] == 4
    assert config.runs[1].config.train.seed == 1
    assert full.output_dir == str(tmp_path / "c" / "runs" / "full" / "seed-0")
    assert len({r.key for r in config.runs}) == 4  # every run has its own identity
    assert config.reference == "full"


def test_every_problem_of_every_run_is_reported(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    runs = [
        {"name": "lora", "adapter": {"method": "lora", "r": 0}},
        {"name": "lora", "adapter": {"method": "ia3"}},
        {"name": "bad name!"},
        {"name": "ia3", "adapter": {"method": "ia3"}, "train": {"lr": "fast"}},
    ]
    data = comparison(
        tiny_model_dir, reviews_csv, tmp_path, runs=runs, seeds=[1, 1], target_fraction=2, colour="blue"
    )
    with pytest.raises(ConfigError) as info:
        parse_compare_config(data)
    text = str(info.value)
    assert (
        "compare.seeds" in text
        and "compare.target_fraction" in text
        and "compare.colour: unknown key" in text
    )
    assert "compare.runs[1]: the name 'lora' is used twice" in text
    assert "compare.runs[2]: expected a mapping with a name" in text
    assert "compare.runs[3] (ia3): train.lr" in text and "compare.runs[0] (lora): adapter" in text


def test_missing_sections_and_unknown_only_names_say_what_to_do(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    data = comparison(tiny_model_dir, reviews_csv, tmp_path)
    with pytest.raises(ConfigError, match="no compare: section"):
        parse_compare_config({k: v for k, v in data.items() if k != "compare"})
    with pytest.raises(ConfigError, match="list at least one run"):
        parse_compare_config({**data, "compare": {"runs": []}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_compare_config(tmp_path / "nope.yaml")
    config = parse_compare_config(data)
    assert [r.name for r in config.select(["lora"]).runs] == ["lora", "lora"]
    with pytest.raises(ConfigError, match="'dora' not among the runs"):
        config.select(["dora"])


def test_overrides_and_seeds_apply_to_every_run(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    data = comparison(tiny_model_dir, reviews_csv, tmp_path)
    config = parse_compare_config(data, ["train.steps=9", "compare.target_fraction=0.8"], seeds=[5])
    assert {r.config.train.steps for r in config.runs} == {9} and config.target_fraction == 0.8
    assert [r.seed for r in config.runs] == [5, 5]


def test_without_a_full_run_the_best_run_is_the_reference(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    runs = [{"name": "lora", "adapter": {"method": "lora"}}, {"name": "ia3", "adapter": {"method": "ia3"}}]
    assert (
        parse_compare_config(comparison(tiny_model_dir, reviews_csv, tmp_path, runs=runs)).reference is None
    )
    with pytest.raises(ConfigError, match="compare.reference: 'nope'"):
        parse_compare_config(comparison(tiny_model_dir, reviews_csv, tmp_path, runs=runs, reference="nope"))


def test_the_demo_config_plans_seven_tuned_runs_with_three_seeds():
    config = load_compare_config(DEMO)
    assert config.names == ["full", "lora", "ia3", "prompt", "bitfit", "bottleneck", "auto"]
    assert config.seeds == [0, 1, 2] and len(config.runs) == 21
    assert set(config.tuning) == set(config.names)
    assert {t.run.seed for plan in config.tuning.values() for t in plan.trials} == {3}
    assert {r.config.train.steps for r in config.runs} == {60}
    assert open("configs/compare-sentiment-minilm.yaml").read() == open(DEMO).read()
    assert (
        open(DEMO).readline()
        == "# peftkit compare configs/compare-sentiment-minilm.yaml      (this is also what `peftkit demo` runs)\n"
    )


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tiny_model_dir, reviews_csv, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("compare")
    config = parse_compare_config(comparison(tiny_model_dir, reviews_csv, out))
    lines: list[str] = []
    result = run_comparison(config, log=lines.append, progress=False)
    return config, result, lines


@pytest.mark.slow
def test_every_run_writes_a_complete_record(compared):
    config, result, _ = compared
    assert result.ok and result.ran == [r.label for r in config.runs] and not result.skipped
    assert len(result.records) == 4
    for record in result.records:
        assert record["status"] == "completed" and record["steps"] == 6
        assert record["versions"]["torch"] and record["machine"]["cores"]
        assert record["config"]["train"]["seed"] == record["seed"]
        assert 0 <= record["test"]["accuracy"] <= 1
        assert record["peak_memory_mb"] > 0 and record["train_seconds"] > 0 and record["examples_per_s"] > 0
        assert record["artifact_bytes"] > 0
        assert [row[0] for row in record["curves"]["eval"]] == [3, 6]
        latency = record["latency_ms"]
        assert latency["batch_size"] == 8 and all(latency[k] > 0 for k in ("base", "unmerged", "merged"))
        forgetting = record["forgetting"]
        assert forgetting["measure"] == "1 - 5-NN retention" and 0 <= forgetting["forgetting"] <= 1
    full = [r for r in result.records if r["name"] == "full"]
    lora = [r for r in result.records if r["name"] == "lora"]
    assert full[0]["trainable_percent"] == 100.0 and lora[0]["trainable_percent"] < 100
    assert lora[0]["artifact_bytes"] < full[0]["artifact_bytes"] / 5
    assert full[0]["artifact"] == "model" and lora[0]["artifact"] == "adapter"
    # the seeds differ (head init, data order): identical results would mean the seed is ignored
    assert full[0]["curves"]["train"] != full[1]["curves"]["train"]


def _markdown_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return {
        cells_[0].rstrip(" ◆"): cells_
        for cells_ in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:])
    }


@pytest.mark.slow
def test_the_report_table_matches_the_records(compared):
    config, result, _ = compared
    text = result.report["markdown"].read_text()
    rows = _markdown_rows(text)
    floor = rows.pop("(majority class)")  # the floor every row is read against, from the data alone
    assert set(rows) == {"full", "lora"}
    from peftkit.run.runner import build_task

    splits = build_task(config.runs[0].config).load_data()
    train, test = [e["label"] for e in splits["train"]], [e["label"] for e in splits["test"]]
    majority = max(sorted(set(train)), key=train.count)
    assert float(floor[1]) == pytest.approx(sum(t == majority for t in test) / len(test), abs=5e-5)
    header = [c.format(metric="accuracy") for c in COLUMNS]
    for name, row in rows.items():
        records = [r for r in result.records if r["name"] == name]
        accuracy = [r["test"]["accuracy"] for r in records]
        mean_, sd = re.fullmatch(r"([\d.]+) ± ([\d.]+)", row[header.index("test accuracy")]).groups()
        assert float(mean_) == pytest.approx(statistics.mean(accuracy), abs=5e-5)
        assert float(sd) == pytest.approx(statistics.stdev(accuracy), abs=5e-5)
        memory = row[header.index("peak train memory (MB)")].split(" ± ")[0]
        assert float(memory) == pytest.approx(statistics.mean(r["peak_memory_mb"] for r in records), abs=0.5)
        params = records[0]["trainable_params"]
        assert f"({100 * params / records[0]['total_params']:.3g}%)" in row[header.index("trainable params")]
        forgetting = float(row[header.index("forgetting")].split(" ± ")[0])
        assert forgetting == pytest.approx(
            statistics.mean(r["forgetting"]["forgetting"] for r in records), abs=5e-4
        )
    summary = json.loads((config.output_dir / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["full", "lora"]
    html = result.report["html"].read_text()
    assert (
        html.count("data:image/png;base64,") == 4
        and "<script" not in html
        and "http" not in html.split("<body>")[1]
    )
    for name in rows:  # the HTML shows the same cells
        floor_record = json.loads((config.output_dir / "baseline.json").read_text())
        summary_obj = summarise(
            result.records, config.names, reference=config.reference, baseline=floor_record
        )
        row = next(r for r in summary_obj.rows if r.name == name)
        for cell in cells(row, summary_obj):
            assert cell.replace("&", "&amp;") in html


@pytest.mark.slow
def test_a_second_run_skips_finished_runs_and_redoes_missing_ones(compared, tiny_model_dir, reviews_csv):  # noqa: F811
    config, first, _ = compared
    again = run_comparison(config, log=lambda line: None, progress=False, report=False)
    assert again.ran == [] and len(again.skipped) == 4
    removed = compare_runner.record_path(config.output_dir, config.runs[3])
    before = read_record(removed)
    removed.unlink()
    (config.output_dir / "runs" / "lora" / "seed-1" / "partial-file").parent.mkdir(
        parents=True, exist_ok=True
    )
    redo = run_comparison(config, log=lambda line: None, progress=False, report=False)
    assert redo.ran == ["lora seed 1"]
    after = read_record(removed)
    assert after["test"] == before["test"]  # the same seed gives the same result
    assert not (config.output_dir / "runs" / "lora" / "seed-1" / "partial-file").exists()


@pytest.mark.slow
def test_a_changed_config_makes_its_records_stale(compared):
    config, _, _ = compared
    changed = parse_compare_config({**config.source, "output_dir": str(config.output_dir)}, ["train.steps=7"])
    assert all(
        not compare_runner.is_current(read_record(compare_runner.record_path(config.output_dir, r)), r)
        for r in changed.runs
    )
    assert all(
        compare_runner.is_current(read_record(compare_runner.record_path(config.output_dir, r)), r)
        for r in config.runs
    )


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_finish(tiny_model_dir, reviews_csv, tmp_path, capsys):  # noqa: F811
    runs = [
        {"name": "broken", "adapter": {"method": "lora", "target_modules": ["no_such_module"]}},
        {"name": "lora", "adapter": {"method": "lora", "r": 2, "target_modules": ["query"]}},
    ]
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps(comparison(tiny_model_dir, reviews_csv, tmp_path / "out", runs=runs, seeds=1)))
    assert main(["compare", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "broken seed 0 FAILED" in out and "no_such_module" in out
    assert "1 run(s) failed: broken seed 0" in err and "run the same command again" in err
    record = read_record(tmp_path / "out" / "records" / "broken-seed0.json")
    assert record["status"] == "failed" and "no_such_module" in record["error"]
    assert read_record(tmp_path / "out" / "records" / "lora-seed0.json")["status"] == "completed"
    assert "| lora ◆ |" in (tmp_path / "out" / "report.md").read_text()


def test_a_killed_worker_loses_only_its_run(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):  # noqa: F811
    config = parse_compare_config(comparison(tiny_model_dir, reviews_csv, tmp_path, seeds=1))
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    monkeypatch.setattr(compare_runner, "python_command", lambda: killed)
    lines: list[str] = []
    result = run_comparison(config, log=lines.append, progress=False, report=False)
    assert result.failed == ["full seed 0", "lora seed 0"] and result.records == []
    assert any("the process ended without a record" in line for line in lines)


def test_report_command_needs_records(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no run records" in capsys.readouterr().err


@pytest.mark.slow
def test_report_command_rewrites_the_report(compared, capsys):
    config, result, _ = compared
    shutil.rmtree(config.output_dir / "figures")
    (config.output_dir / "report.html").unlink()
    assert main(["report", str(config.output_dir)]) == 0
    assert (config.output_dir / "report.html").is_file() and len(
        list((config.output_dir / "figures").glob("*.png"))
    ) == 4
    assert "| full |" in capsys.readouterr().out.replace(" ◆", "")


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(compared, tmp_path):
    """Chromium draws the HTML report: the screenshot is a real, non-blank page of the expected height."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "chromium is not installed (`sudo apt-get install chromium`, or `make system-data` as root)"
        )
    config, result, _ = compared
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,3000",
            f"--screenshot={shot}",
            result.report["html"].as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 3000)
    histogram = image.histogram()
    white = sum(histogram[250:]) / sum(histogram)
    assert 0.4 < white < 0.98  # a page with text and figures on a white background, not blank, not black
    top = image.crop((0, 0, 1280, 1500))  # the summary table and the first figure are drawn near the top
    assert sum(top.histogram()[:128]) > 0.01 * 1280 * 1500


def test_the_docs_list_every_compare_setting_with_its_default():
    from pathlib import Path

    from peftkit.compare.config import SETTINGS

    text = (Path(__file__).resolve().parents[2] / "docs" / "compare.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE))
    assert set(rows) == set(SETTINGS)
    for key, (default, _) in SETTINGS.items():
        expected = "(required)" if key == "runs" else "`null`" if default is None else f"`{default}`"
        assert rows[key].strip() == expected, key


def test_time_left_uses_each_methods_own_durations_then_the_mean():
    from types import SimpleNamespace

    runs = [SimpleNamespace(name="full"), SimpleNamespace(name="lora"), SimpleNamespace(name="ia3")]
    assert compare_runner._time_left(runs, {}) is None  # nothing measured yet: no guess
    assert compare_runner._time_left([], {}) == 0.0
    durations = {"full": [60.0, 80.0], "lora": [30.0]}
    assert compare_runner._time_left(runs, durations) == 70.0 + 30.0 + statistics.mean([60.0, 80.0, 30.0])


# -- tuning (compare.tune) ---------------------------------------------------------------------------


def test_tune_settings_problems_are_reported_together(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    runs = [
        {
            "name": "lora",
            "adapter": {"method": "lora", "r": 4, "target_modules": ["query"]},
            "tune": {"adapter.r": []},
        },
        {"name": "ia3", "adapter": {"method": "ia3"}, "tune": "yes"},
    ]
    data = comparison(
        tiny_model_dir,
        reviews_csv,
        tmp_path,
        runs=runs,
        tune={"lr": [1e-3, -1], "seeds": 0, "steps": 1.5, "colour": [1]},
    )
    with pytest.raises(ConfigError) as info:
        parse_compare_config(data)
    text = str(info.value)
    for expected in (
        "compare.tune.lr: expected positive learning rates",
        "compare.tune.seeds: expected a positive",
        "compare.tune.steps: expected a positive",
        "compare.tune.colour: unknown key",
        "compare.runs[0].tune.adapter.r: expected a non-empty list",
        "compare.runs[1].tune: expected a mapping",
    ):
        assert expected in text


def test_the_search_uses_its_own_seeds_and_each_methods_candidates(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    from peftkit.methods.lora import LoraConfig
    from peftkit.run.config import FULL_FINE_TUNING_LR_CANDIDATES

    runs = [
        {"name": "full", "adapter": {"method": "full"}},
        {"name": "lora", "adapter": {"method": "lora", "r": 4, "target_modules": ["query"]}},
        {
            "name": "grid",
            "adapter": {"method": "lora", "r": 4, "target_modules": ["query"]},
            "tune": {"lr": [1e-3, 1e-2], "adapter.r": [2, 8], "steps": 4},
        },
        {"name": "ia3", "adapter": {"method": "ia3"}, "tune": False},
    ]
    config = parse_compare_config(
        comparison(tiny_model_dir, reviews_csv, tmp_path, runs=runs, tune={"seeds": 2})
    )
    assert set(config.tuning) == {"full", "lora", "grid"}  # tune: false opts out
    lr = [c["train.lr"] for c in config.tuning["lora"].candidates]
    assert lr == list(LoraConfig.lr_candidates)
    assert [c["train.lr"] for c in config.tuning["full"].candidates] == list(FULL_FINE_TUNING_LR_CANDIDATES)
    # test seeds 0, 1: the search seeds come after them, so a reported seed never takes part in the choice
    assert {t.run.seed for t in config.tuning["lora"].trials} == {2, 3}
    grid = config.tuning["grid"]
    assert grid.candidates == [
        {"train.lr": 1e-3, "adapter.r": 2},
        {"train.lr": 1e-3, "adapter.r": 8},
        {"train.lr": 1e-2, "adapter.r": 2},
        {"train.lr": 1e-2, "adapter.r": 8},
    ]
    trial = grid.trials[-1].run.config
    assert (trial.train.lr, trial.adapter["r"], trial.train.steps) == (1e-2, 8, 4)
    assert "/tune/grid/lr-0.01_r-8-seed-3" in trial.output_dir.replace("\\", "/")
    # the chosen values replace the configured ones in the runs that are reported
    chosen = config.with_choices({"grid": {"train.lr": 1e-3, "adapter.r": 8}})
    after = [r for r in chosen.runs if r.name == "grid"]
    assert {(r.config.train.lr, r.config.adapter["r"], r.config.train.steps) for r in after} == {(1e-3, 8, 6)}
    assert [r.key for r in chosen.runs if r.name != "grid"] == [
        r.key for r in config.runs if r.name != "grid"
    ]


def test_the_choice_follows_the_validation_metric():
    from types import SimpleNamespace

    from peftkit.compare.tune import Trial, TunePlan, choose

    plan = TunePlan(
        "lora",
        [{"train.lr": 1e-4}, {"train.lr": 1e-3}, {"train.lr": 1e-2}],
        [
            Trial(i, SimpleNamespace(seed=s, config=SimpleNamespace(train=SimpleNamespace(steps=5))))
            for i in range(3)
            for s in (3, 4)
        ],
    )

    def rec(value, status="completed"):
        return {"best_validation": value, "status": status, "wall_seconds": 2.0}

    records = {
        0: [rec(0.6), rec(0.7)],
        1: [rec(0.8), rec(0.6)],
        2: [rec(None, "diverged"), rec(None, "diverged")],
    }
    outcome = choose(plan, records, greater_is_better=True)
    assert outcome["chosen"] == {"train.lr": 1e-3}  # mean 0.70 beats 0.65; the diverged candidate cannot win
    assert outcome["candidates"][2]["validation"] is None and outcome["seconds"] == 12.0
    assert choose(plan, records, greater_is_better=False)["chosen"] == {"train.lr": 1e-4}
    assert outcome["edge"] is None and choose(plan, records, greater_is_better=False)["edge"] == "lowest"
    records[1] = [rec(0.9), rec(0.8)]
    assert choose(plan, records, greater_is_better=True)["chosen"] == {"train.lr": 1e-3}
    assert choose(plan, records, greater_is_better=False)["chosen"] == {"train.lr": 1e-4}
    assert choose(plan, {0: [rec(0.5)], 1: [rec(0.5)]}, True)["chosen"] == {
        "train.lr": 1e-4
    }  # ties: the first
    assert choose(plan, {2: [rec(None, "failed")]}, True)["chosen"] is None


def test_a_tie_in_the_search_goes_to_the_better_validation_curve():
    # the demo's LoRA search at issue 24's defaults: 2e-3 and 5e-3 both peaked at 0.7673 on validation;
    # 5e-3 got there sooner (0.739, 0.739, 0.767 against 0.660, 0.733, 0.767)
    from types import SimpleNamespace

    from peftkit.compare.tune import Trial, TunePlan, choose

    plan = TunePlan(
        "lora",
        [{"train.lr": 5e-4}, {"train.lr": 2e-3}, {"train.lr": 5e-3}],
        [
            Trial(i, SimpleNamespace(seed=3, config=SimpleNamespace(train=SimpleNamespace(steps=60))))
            for i in range(3)
        ],
    )

    def rec(curve):
        points = [[20 * (i + 1), v, 1.0, 0.5] for i, v in enumerate(curve)]
        return {"best_validation": max(curve), "status": "completed", "curves": {"eval": points}}

    records = {
        0: [rec([0.642, 0.638, 0.651])],
        1: [rec([0.660, 0.733, 0.767])],
        2: [rec([0.739, 0.739, 0.767])],
    }
    outcome = choose(plan, records, greater_is_better=True)
    assert outcome["chosen"] == {"train.lr": 5e-3} and outcome["edge"] == "highest"
    assert outcome["candidates"][2]["curve_mean"] == pytest.approx((0.739 + 0.739 + 0.767) / 3)
    # a strictly better best value still wins whatever its curve
    records[1] = [rec([0.5, 0.5, 0.770])]
    assert choose(plan, records, greater_is_better=True)["chosen"] == {"train.lr": 2e-3}
    # lower is better: the lower curve wins the tie; records without curves fall back to the first listed
    low = {1: [rec([0.9, 0.5])], 2: [rec([0.6, 0.5])]}
    assert choose(plan, low, greater_is_better=False)["chosen"] == {"train.lr": 5e-3}
    bare = {
        1: [{"best_validation": 0.5, "status": "completed"}],
        2: [{"best_validation": 0.5, "status": "completed"}],
    }
    assert choose(plan, bare, greater_is_better=True)["chosen"] == {"train.lr": 2e-3}


@pytest.mark.slow
def test_tuning_end_to_end_is_resumable_and_reported(tiny_model_dir, reviews_csv, tmp_path):  # noqa: F811
    from peftkit.compare.tune import read_outcomes

    runs = [
        {
            "name": "lora",
            "adapter": {"method": "lora", "r": 4, "target_modules": ["query", "value"]},
            "tune": {"lr": [1e-5, 3e-2]},
        }
    ]
    out = tmp_path / "c"
    data = comparison(tiny_model_dir, reviews_csv, out, runs=runs, seeds=1, probe_examples=0)
    lines: list[str] = []
    result = run_comparison(parse_compare_config(data), log=lines.append, progress=False)
    assert result.ok
    trials = {p.name: read_record(p) for p in (out / "records" / "tune").glob("*.json")}
    assert set(trials) == {"lora-lr-1e-05-seed1.json", "lora-lr-0.03-seed1.json"}
    best = max(trials.values(), key=lambda r: r["best_validation"])
    outcome = read_outcomes(out)["lora"]
    assert outcome["chosen"] == {"train.lr": best["config"]["train"]["lr"]}
    assert [r["config"]["train"]["lr"] for r in result.records] == [best["config"]["train"]["lr"]]
    assert "latency_ms" not in best and "latency_ms" in result.records[0]  # trials skip the measurements
    report = (out / "report.md").read_text()
    assert (
        "## Tuning" in report
        and "lr-1e-05: " in report
        and (out / "figures" / "tuning.png").stat().st_size > 0
    )

    # again: nothing trains; without one trial record, only that trial (and nothing else) runs again
    lines.clear()
    run_comparison(parse_compare_config(data), log=lines.append, progress=False)
    assert not any("trial(s) to run" in line for line in lines)
    (out / "records" / "tune" / "lora-lr-1e-05-seed1.json").unlink()
    lines.clear()
    again = run_comparison(parse_compare_config(data), log=lines.append, progress=False)
    assert any("1 trial(s) to run" in line for line in lines) and again.ran == []


def _record(name, seed, value, params, method="lora", base=100.0):
    return {
        "name": name,
        "seed": seed,
        "status": "completed",
        "metric": "accuracy",
        "greater_is_better": True,
        "test": {"accuracy": value},
        "trainable_params": params,
        "method": method,
        "latency_ms": {"base": base, "unmerged": base, "merged": base},
    }


def test_a_row_at_the_majority_class_is_not_on_the_front_and_the_table_shows_the_floor():
    from peftkit.report.render import legend, markdown

    records = [_record("bitfit", s, 0.58, 100) for s in range(3)] + [
        _record("lora", s, v, 1000, base=130.0 if s else 100.0) for s, v in enumerate((0.80, 0.78, 0.79))
    ]
    summary = summarise(records, baseline={"name": "majority class", "accuracy": 0.58})
    assert [r.pareto for r in summary.rows] == [
        False,
        True,
    ]  # without the floor, bitfit's 100 params would win
    assert [r.pareto for r in summarise(records).rows] == [True, True]
    text = markdown(summary)
    assert "| (majority class) | 0.5800 | 0 |" in text and "most frequent class" in legend(summary)
    assert "ranged over 30% between runs" in legend(summary)  # the same base model timed 100 and 130 ms
    from peftkit.report.render import _title

    assert _title(summary).startswith("PEFT methods compared")  # no full fine-tuning run to set PEFT against


def _old_record_config():
    # config.yaml of the demo's lora seed-0 run as written before the generation section, data.hub,
    # the chat fields, train.report_to, the null greater_is_better, model.base_dropout and
    # train.precision "auto" existed
    from pathlib import Path

    from peftkit.run.config import load_config

    return load_config(Path(__file__).parent / "records" / "compare-record-config-2026-12-05.yaml")


def _with(config, **sections):
    import dataclasses

    return dataclasses.replace(
        config, **{name: dataclasses.replace(getattr(config, name), **v) for name, v in sections.items()}
    )


OLD_RECORD_KEY = "214ee16a13f67a84"  # the key that record was stored under


def test_a_finished_record_keeps_its_key_when_fields_are_added_later():
    from peftkit.compare.config import config_key

    # at the settings it ran with (the base's dropout kept, fp32), the added fields change nothing
    ran = _with(_old_record_config(), model={"base_dropout": "keep"}, train={"precision": "fp32"})
    assert config_key(ran) == OLD_RECORD_KEY


def test_a_changed_default_changes_the_key_of_the_runs_it_changes(monkeypatch):
    from peftkit.compare.config import config_key

    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "fp32")  # a machine without native bf16
    old = _old_record_config()  # as written: no base_dropout (so "auto"), and the whole train section
    assert old.model.base_dropout == "auto" and old.train.precision == "fp32"
    # a LoRA run's "auto" base dropout is now attention_off: the record no longer describes it
    assert config_key(old) != OLD_RECORD_KEY
    kept = _with(old, model={"base_dropout": "keep"}, train={"precision": "auto"})
    assert config_key(kept) == OLD_RECORD_KEY  # "auto" precision resolves to fp32 there
    monkeypatch.setenv("PEFTKIT_AUTO_PRECISION", "bf16")  # a machine with native bf16
    assert config_key(kept) != OLD_RECORD_KEY
    assert config_key(kept) == config_key(_with(kept, train={"precision": "bf16"}))


def test_padding_changes_the_key_only_of_runs_it_pads():
    from peftkit.compare.config import config_key

    fp32 = _with(_old_record_config(), model={"base_dropout": "keep"}, train={"precision": "fp32"})
    # fp32: "auto" pads to the longest example, as every run did before the field existed
    assert config_key(_with(fp32, data={"pad_to_multiple_of": "auto"})) == OLD_RECORD_KEY
    assert config_key(_with(fp32, data={"pad_to_multiple_of": 1})) == OLD_RECORD_KEY
    assert config_key(_with(fp32, data={"pad_to_multiple_of": 8})) != OLD_RECORD_KEY
    # bf16: "auto" is 8, the same run as asking for 8
    bf16 = _with(fp32, train={"precision": "bf16"})
    assert config_key(bf16) == config_key(_with(bf16, data={"pad_to_multiple_of": 8}))
    assert config_key(bf16) != config_key(_with(bf16, data={"pad_to_multiple_of": 1}))


def test_a_base_dropout_other_than_keep_changes_the_key_and_keep_does_not():
    from peftkit.compare.config import config_key

    old = _with(_old_record_config(), train={"precision": "fp32"})

    def with_dropout(mode: str):
        return config_key(_with(old, model={"base_dropout": mode}))

    assert with_dropout("keep") == OLD_RECORD_KEY
    assert with_dropout("auto") == with_dropout("attention_off")  # a LoRA run
    assert len({with_dropout("keep"), with_dropout("attention_off"), with_dropout("all_off")}) == 3
