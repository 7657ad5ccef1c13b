"""The benchmark suite's own logic: run order, pairing and ratio arithmetic, targets, the results file.

Timings are never asserted (they belong to the benchmark, not the tests); the tiny models here only
check that every kind of case runs and records what the summary reads.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, run, summarise, worker  # noqa: E402
from benchmarks.cases import Case, Job  # noqa: E402

pytest.importorskip("peft", reason="the suite compares with the reference library: pip install peft==0.21.2")


def _case(
    name: str,
    kind: str = "train",
    method: str = "lora",
    targets: str = "qv",
    model: str = "minilm",
    libs: tuple[str, ...] = ("peftkit", "peft"),
    timed: int = 1,
) -> Case:
    return Case(name, kind, model, method, targets, libs, timed=timed)


def _record(case: str, lib: str, rep: int, ok: bool = True, **metrics: float) -> dict:
    return {
        "case": case,
        "lib": lib,
        "rep": rep,
        "ok": ok,
        "metrics": metrics,
        "info": {},
        "error": None if ok else "RuntimeError: boom",
    }


# -- run order -------------------------------------------------------------------------------------


def test_schedule_interleaves_libraries_pair_by_pair_and_repetitions_outermost():
    a, b, full = _case("a"), _case("b"), _case("full", method="full", libs=("torch",))
    jobs = run.schedule([a, b, full], reps=3, weights="tiny")
    order = [(j.rep, j.case.name, j.lib) for j in jobs]
    one_rep = [("a", "peftkit"), ("a", "peft"), ("b", "peftkit"), ("b", "peft"), ("full", "torch")]
    assert order == [(rep, name, lib) for rep in range(3) for name, lib in one_rep]
    assert {j.weights for j in jobs} == {"tiny"}


def test_select_matches_names_and_patterns_and_names_the_cases_when_nothing_matches():
    all_cases = cases.default_cases()
    assert [c.name for c in run.select(all_cases, ["train-minilm-lora-qv"])] == ["train-minilm-lora-qv"]
    smol = run.select(all_cases, ["train-smollm2-*,mixed-*"])
    assert {c.name for c in smol} == {
        "train-smollm2-lora-qv",
        "train-smollm2-lora-all",
        "train-smollm2-full",
        "mixed-minilm-lora-qv",
    }
    assert run.select(all_cases, None) == all_cases
    with pytest.raises(SystemExit, match="matches no case; the cases are: train-minilm-lora-qv"):
        run.select(all_cases, ["train-bert"])


def test_default_suite_covers_the_issue():
    by_name = {c.name: c for c in cases.default_cases()}
    assert len(by_name) == len(cases.default_cases()), "case names must be unique"
    train = [c for c in by_name.values() if c.kind == "train"]
    assert {(c.model, c.method, c.targets) for c in train} >= {
        ("minilm", "lora", "qv"),
        ("minilm", "lora", "all"),
        ("minilm", "dora", "qv"),
        ("minilm", "full", "all"),
        ("smollm2", "lora", "qv"),
        ("smollm2", "lora", "all"),
        ("smollm2", "full", "all"),
    }
    assert {c.kind for c in by_name.values()} == {"train", "infer", "mixed"}
    for case in by_name.values():
        assert case.libs in (("peftkit", "peft"), ("torch",))  # A B order: peftkit first, then the reference


def test_estimate_left_uses_the_closest_finished_jobs():
    a, b, c = _case("a"), _case("b"), _case("c")
    done = [(Job(a, "peftkit", 0), 10.0), (Job(a, "peft", 0), 20.0), (Job(b, "peftkit", 0), 4.0)]
    left = [Job(a, "peft", 1), Job(b, "peft", 0), Job(c, "peftkit", 0)]
    # same (case, lib): 20; same case: 4; nothing alike: the mean of all, 34/3
    assert run.estimate_left(done, left) == pytest.approx(20 + 4 + 34 / 3)
    assert run.estimate_left([], left) == 0.0


def test_a_time_budget_stops_only_between_whole_repetitions():
    jobs = run.schedule([_case("a")], reps=3)
    done = [(jobs[0], 10.0), (jobs[1], 10.0)]  # repetition 0 took 20 s
    assert not run.stop_before(jobs[1], done[:1], 5, 100), "never in the middle of a repetition"
    assert run.stop_before(jobs[2], done, 35, 20)  # 20 s used + 20 s expected > 35
    assert not run.stop_before(jobs[2], done, 45, 20)
    assert not run.stop_before(jobs[2], done, None, 1e9)
    assert not run.stop_before(jobs[0], [], 1, 100), "the first repetition always runs"


# -- arithmetic ------------------------------------------------------------------------------------


def test_stats_median_spread_and_quartiles():
    s = summarise.stats([0.9, None, 0.7, 0.8, 1.1, 0.75])
    assert s["n"] == 5 and s["median"] == 0.8 and (s["min"], s["max"]) == (0.7, 1.1)
    assert (s["q1"], s["q3"]) == (0.75, 0.9)
    assert summarise.stats([None]) is None
    assert summarise.stats([2.0]) == {"median": 2.0, "min": 2.0, "max": 2.0, "q1": 2.0, "q3": 2.0, "n": 1}


def test_ratios_pair_by_repetition_not_by_position_and_skip_failed_processes():
    records = [
        _record("t", "peftkit", 0, step_s=1.0),
        _record("t", "peft", 0, step_s=2.0),
        _record("t", "peftkit", 1, ok=False),
        _record("t", "peft", 1, step_s=9.0),
        _record("t", "peft", 2, step_s=4.0),
        _record("t", "peftkit", 2, step_s=3.0),
    ]
    ours = summarise.by_rep(records, "t", "peftkit", "step_s")
    assert ours == {0: 1.0, 2: 3.0}
    assert summarise.paired_ratios(ours, summarise.by_rep(records, "t", "peft", "step_s")) == [0.5, 0.75]


def _train_result() -> tuple[list[dict], list[dict]]:
    qv = _case("train-qv", targets="all")
    dora = _case("train-dora", method="dora")
    full = _case("train-full", method="full", targets="all", libs=("torch",))
    records = []
    ours, theirs, fulls = [2.0, 2.2, 1.8, 2.1, 1.9], [2.5, 2.4, 2.6, 2.5, 2.3], [3.0, 3.1, 2.9, 3.0, 3.2]
    for rep in range(5):
        records += [
            _record("train-qv", "peftkit", rep, step_s=ours[rep], peak_mb=800.0, overhead_mb=300.0),
            _record("train-qv", "peft", rep, step_s=theirs[rep], peak_mb=1000.0, overhead_mb=500.0),
            _record("train-dora", "peftkit", rep, step_s=2.0, peak_mb=900.0, overhead_mb=1.0),
            _record("train-dora", "peft", rep, step_s=2.4, peak_mb=900.0, overhead_mb=1.0),
            _record("train-full", "torch", rep, step_s=fulls[rep], peak_mb=850.0, overhead_mb=400.0),
        ]
    return records, [c.to_dict() for c in (qv, dora, full)]


def test_summary_medians_of_paired_ratios_with_their_spread():
    records, case_dicts = _train_result()
    summary = summarise.summarise(records, case_dicts)
    case = summary["cases"]["train-qv"]
    expected = [o / t for o, t in zip([2.0, 2.2, 1.8, 2.1, 1.9], [2.5, 2.4, 2.6, 2.5, 2.3])]
    ratio = case["ratios"]["step_s peftkit/peft"]
    assert ratio["median"] == pytest.approx(statistics.median(expected))
    assert (ratio["min"], ratio["max"]) == (pytest.approx(min(expected)), pytest.approx(max(expected)))
    # not the ratio of the medians: 2.0 / 2.5 = 0.8 differs from the median of the pairs
    assert ratio["median"] != pytest.approx(2.0 / 2.5)
    vs_full = case["ratios"]["step_s peftkit/full"]
    assert vs_full["median"] == pytest.approx(
        statistics.median([o / f for o, f in zip([2.0, 2.2, 1.8, 2.1, 1.9], [3.0, 3.1, 2.9, 3.0, 3.2])])
    )
    assert case["libs"]["peft"]["step_s"]["median"] == 2.5
    assert case["ratios"]["peak_mb peftkit/peft"]["median"] == pytest.approx(0.8)


def test_targets_say_met_or_missed_by_how_much():
    records, case_dicts = _train_result()
    found = {(t["case"], t["target"]): t for t in summarise.summarise(records, case_dicts)["targets"]}
    step = found[("train-qv", "lora step time peftkit/peft <= 0.9")]
    assert step["met"] is True and step["verdict"] == "met"
    memory = found[("train-qv", "peak training memory peftkit/peft <= 0.85")]
    assert memory["met"] is True  # 800 / 1000
    vs_full = found[("train-qv", "peak training memory peftkit/full fine-tuning <= 1")]
    assert vs_full["met"] is True and vs_full["value"] == pytest.approx(800 / 850)
    dora = found[("train-dora", "dora step time peftkit/peft <= 0.8")]
    assert dora["met"] is False and dora["value"] == pytest.approx(2.0 / 2.4)
    assert dora["verdict"].startswith("missed by 0.0333")


def test_peak_memory_above_full_fine_tuning_is_a_miss():
    records, case_dicts = _train_result()
    for record in records:
        if record["case"] == "train-qv" and record["lib"] == "peftkit":
            record["metrics"]["peak_mb"] = 900.0
    found = {(t["case"], t["target"]): t for t in summarise.summarise(records, case_dicts)["targets"]}
    vs_full = found[("train-qv", "peak training memory peftkit/full fine-tuning <= 1")]
    assert vs_full["met"] is False and vs_full["value"] == pytest.approx(900 / 850)


def test_inference_and_mixed_targets():
    infer = _case("infer", kind="infer", targets="all")
    mixed = _case("mixed", kind="mixed")
    records = []
    for rep in range(3):
        records += [
            _record(
                "infer",
                "peftkit",
                rep,
                base_s=1.0,
                unmerged_s=1.05,
                merged_s=1.01,
                unmerged_overhead=0.05,
                merged_overhead=-0.01,
                save_s=0.01,
                load_s=0.02,
            ),
            _record(
                "infer",
                "peft",
                rep,
                base_s=1.0,
                unmerged_s=1.2,
                merged_s=1.0,
                unmerged_overhead=0.2,
                merged_overhead=0.0,
                save_s=0.02,
                load_s=0.04,
            ),
            _record("mixed", "peftkit", rep, single_s=1.0, mixed_s=1.4, mixed_over_single=1.4),
            _record("mixed", "peft", rep, single_s=1.0, mixed_s=2.0, mixed_over_single=2.0),
        ]
    summary = summarise.summarise(records, [infer.to_dict(), mixed.to_dict()])
    found = {t["target"]: t for t in summary["targets"]}
    share = found["unmerged overhead over base, peftkit/peft <= 0.5"]
    assert share["met"] is True and share["value"] == pytest.approx(0.25)
    assert found["merged latency within 2% of base (abs(merged/base - 1))"]["value"] == pytest.approx(0.01)
    assert found["4-adapter mixed batch / single-adapter batch (peftkit) <= 1.3"]["met"] is False
    faster = found["mixed batch time peftkit/peft < 1"]
    assert faster["met"] is True and faster["value"] == pytest.approx(0.7)
    assert summary["cases"]["infer"]["ratios"]["load_s peftkit/peft"]["median"] == pytest.approx(0.5)


def test_a_target_that_cannot_be_measured_says_why():
    infer = _case("infer", kind="infer", targets="all")
    mixed = _case("mixed", kind="mixed")
    records = [
        _record("infer", "peftkit", 0, unmerged_overhead=0.01, merged_overhead=0.0),
        _record("infer", "peft", 0, unmerged_overhead=-0.02, merged_overhead=0.0),
        _record("mixed", "peftkit", 0, single_s=1.0, mixed_s=None, mixed_over_single=None),
        _record("mixed", "peft", 0, single_s=1.0, mixed_s=2.0, mixed_over_single=2.0),
    ]
    records[2]["info"]["mixed_unavailable"] = "NotImplementedError: no per_example_adapters"
    found = {
        t["target"]: t for t in summarise.summarise(records, [infer.to_dict(), mixed.to_dict()])["targets"]
    }
    share = found["unmerged overhead over base, peftkit/peft <= 0.5"]
    assert share["met"] is None and "reference's unmerged overhead is -0.020" in share["verdict"]
    mixed_target = found["4-adapter mixed batch / single-adapter batch (peftkit) <= 1.3"]
    assert mixed_target["met"] is None and "no per_example_adapters" in mixed_target["verdict"]


def test_markdown_tables_show_medians_ratios_and_failures():
    records, case_dicts = _train_result()
    records.append(_record("train-dora", "peft", 5, ok=False))
    result = {
        "meta": {"reps": 5, "device": "cpu"},
        "cases": case_dicts,
        "summary": summarise.summarise(records, case_dicts),
    }
    text = summarise.markdown(result)
    assert "| train-qv | 2 | 2.5 | 3 | 0.826 (0.692-0.917) |" in text
    assert "peak RSS" in text and "| lora step time peftkit/peft <= 0.9 | train-qv | 0.826 | met |" in text
    assert "- train-dora: peft rep 5: RuntimeError: boom" in text


# -- the worker and the driver on tiny models ---------------------------------------------------------


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "name,lib",
    [
        ("train-minilm-dora-qv", "peftkit"),
        ("train-smollm2-full", "torch"),
        ("infer-smollm2-lora-all", "peft"),
        ("infer-minilm-lora-all", "peftkit"),
        ("mixed-minilm-lora-qv", "peftkit"),
        ("mixed-minilm-lora-qv", "peft"),
    ],
)
def test_worker_records_what_the_summary_reads(one_thread, name, lib):
    case = {c.name: c for c in cases.default_cases()}[name]
    record = worker.run_job(Job(case, lib, 0, weights="tiny", threads=1, options={"timed": 2}))
    assert record["ok"] and record["env"]["threads"] == 1
    metrics, samples, info = record["metrics"], record["samples"], record["info"]
    for metric in summarise.METRICS[case.kind]:
        assert metric in metrics
    if case.kind == "train":
        assert len(samples["step_s"]) == 2 and metrics["peak_mb"] >= metrics["loaded_mb"] > 0
        # steady state: the full-size warm-up step is timed apart, and not among the timed steps
        assert case.warmup >= 1 and not case.warmup_tokens and len(samples["warmup_s"]) == case.warmup
        assert metrics["first_step_s"] == samples["warmup_s"][0] > 0
        assert (
            info["trainable_params"] == info["total_params"]
            if lib == "torch"
            else info["adapted_modules"] == 4
        )
    elif case.kind == "infer":
        assert len(samples["unmerged"]) == 2 and len(samples["load"]) == worker.SAVE_LOAD_REPEATS
        assert info["unmerged_vs_base_max_abs"] > 1e-3, "the adapter must change the output"
        assert info["merged_vs_unmerged_max_abs"] < 1e-4, "merged and unmerged must compute the same"
    else:
        assert len(samples["single"]) == 2
        if metrics["mixed_s"] is None:  # this peftkit has no mixed-batch API yet: reported, not crashed
            assert lib == "peftkit" and "per_example_adapters" in info["mixed_unavailable"]
        else:
            assert len(samples["mixed"]) == 2
            assert info["mixed_vs_single_a0_max_abs"] < 1e-5, "rows routed to a0 must equal the a0-only batch"


def test_default_training_cases_time_the_steady_state():
    train = [c for c in cases.default_cases() if c.kind == "train"]
    assert train and all(c.timed >= 5 and c.warmup >= 1 and c.warmup_tokens == 0 for c in train)
    assert run.parse_args([]).reps == 2, "make bench: several steps in each of fewer processes"


def test_worker_rejects_full_fine_tuning_outside_training():
    case = _case("infer-full", kind="infer", libs=("torch",))
    with pytest.raises(ValueError, match="full fine-tuning"):
        worker.run_job(Job(case, "torch", 0, weights="tiny", threads=1))


@pytest.mark.slow
def test_end_to_end_two_repetitions_of_one_case_in_fresh_processes(tmp_path):
    out = tmp_path / "tiny.json"
    path = run.main(
        [
            "--weights",
            "tiny",
            "--reps",
            "2",
            "--only",
            "train-minilm-lora-qv",
            "--threads",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert path == out
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert {
        "date",
        "command",
        "versions",
        "peftkit_commit",
        "cpu",
        "platform",
        "threads",
        "duration_s",
    } <= set(meta)
    assert meta["versions"]["torch"] and meta["versions"]["peft"] and meta["threads"] == 1
    records = result["records"]
    assert [(r["rep"], r["lib"]) for r in records] == [
        (0, "peftkit"),
        (0, "peft"),
        (1, "peftkit"),
        (1, "peft"),
    ]
    assert all(r["ok"] for r in records), [r.get("error") for r in records]
    assert all(len(r["samples"]["step_s"]) == 2 and r["env"]["threads"] == 1 for r in records)  # --steps 2
    ratio = result["summary"]["cases"]["train-minilm-lora-qv"]["ratios"]["step_s peftkit/peft"]
    assert ratio["n"] == 2
    assert any(t["case"] == "train-minilm-lora-qv" for t in result["summary"]["targets"])


def test_base_dropout_timing_runs_every_mode_interleaved(one_thread, tmp_path):
    from benchmarks import base_dropout

    out = base_dropout.main(
        ["--weights", "tiny", "--rounds", "3", "--threads", "1", "--json", str(tmp_path / "s.json")]
    )
    assert all(f"  {mode} " in out for mode in base_dropout.MODES) and "x keep" in out
    samples = json.loads((tmp_path / "s.json").read_text())["samples"]
    assert {mode: len(v) for mode, v in samples.items()} == dict.fromkeys(base_dropout.MODES, 3)


def test_interleaving_rotates_the_order_and_times_every_setup_each_round():
    from benchmarks import interleave

    order = []
    first, samples = interleave.time_interleaved({n: lambda n=n: order.append(n) for n in "abc"}, 3)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotated rounds
    assert set(first) == set("abc") and {n: len(v) for n, v in samples.items()} == dict.fromkeys("abc", 3)
    assert interleave.medians({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}


@pytest.mark.parametrize(("case", "expected"), [("train-minilm-lora-qv", 3), ("train-minilm-full", 2)])
def test_precision_timing_runs_every_precision_a_case_allows(one_thread, tmp_path, case, expected):
    from benchmarks import precision

    out = precision.main(
        [
            "--case",
            case,
            "--weights",
            "tiny",
            "--rounds",
            "2",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "p.json"),
        ]
    )
    saved = json.loads((tmp_path / "p.json").read_text())
    assert list(saved["samples"]) == list(precision.PRECISIONS[:expected]) and "x fp32" in out
    assert ("bf16_base" in out) == (expected == 3)  # full fine-tuning has no bf16 base: it would train bf16


def test_defaults_timing_sets_each_side_at_its_defaults(one_thread, tmp_path):
    from benchmarks import defaults

    out = defaults.main(
        ["--weights", "tiny", "--rounds", "2", "--threads", "1", "--json", str(tmp_path / "d.json")]
    )
    saved = json.loads((tmp_path / "d.json").read_text())
    assert list(saved["samples"]) == list(defaults.SETUPS) and "peftkit/peft" in out
    import torch

    from peftkit.train.runtime import resolve_precision

    auto = resolve_precision(
        "auto", torch.device("cpu")
    )  # the suite pins it (conftest) unless told otherwise
    assert saved["precision"] == {"peftkit": auto, "peft": "fp32", "full": auto, "full_fp32": "fp32"}
    with pytest.raises(SystemExit):
        defaults.main(["--case", "train-minilm-full", "--weights", "tiny"])
