"""``peftkit export --check vllm``: vLLM's rules for a saved adapter (docs/vllm.md).

Adapters that vLLM serves (peftkit's and the reference library's LoRA on the tiny Llama) pass with the
exact ``vllm serve`` command; each feature vLLM refuses (another method, DoRA, bias, modules_to_save,
a rank above 512, a convolution target, a base-rewriting init, trained tokens) is reported as an error
with its fix, and version- or model-dependent ones (a rank above the default --max-lora-rank, per-module
scalings, lm_head) as warnings. Then run directories and the command line's exit codes.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.serve.vllm import MAX_LORA_RANKS, check_vllm
from support.tokens import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest

BASE = "org/tiny-llama"


def _model():
    model = tiny_llama(tied=False)
    model.config._name_or_path = BASE  # recorded as base_model_name_or_path on save
    return model


def _peftkit_adapter(directory, config):
    model = _model()
    peftkit.inject(model, config)
    peftkit.save_adapter(model, directory)
    return directory


def _lora(tmp_path, name="lora", **options):
    options = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **options}
    return _peftkit_adapter(tmp_path / name, peftkit.LoraConfig(**options))


def _reference_adapter(directory, config):
    from peft import get_peft_model

    model = get_peft_model(_model(), config)
    model.save_pretrained(directory)
    # it records the model's name_or_path attribute, which a model built from a config lacks
    return _edit_config(directory, base_model_name_or_path=BASE)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def _levels(report):
    return {(f.level, f.check) for f in report.findings}


def _only(report, check):
    (finding,) = [f for f in report.findings if f.check == check]
    return finding


# -- adapters vLLM serves ------------------------------------------------------------------------------


def test_a_peftkit_lora_passes_with_the_vllm_serve_command(tmp_path):
    report = check_vllm(_lora(tmp_path))
    assert report.accepted and report.findings == []
    assert (report.peft_type, report.rank, report.modules, report.base_model) == (
        "LORA",
        8,
        ["q_proj", "v_proj"],
        BASE,
    )
    assert report.max_lora_rank == 8
    directory = (tmp_path / "lora").resolve()
    assert report.command() == (
        f"vllm serve {BASE} --enable-lora --lora-modules lora={shlex.quote(str(directory))} --max-lora-rank 8"
    )
    printed = str(report)
    assert "vLLM would accept this adapter" in printed and report.command() in printed
    assert '"model": "lora"' in printed


def test_a_reference_library_lora_passes(tmp_path):
    from peft import LoraConfig

    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=projections, use_rslora=True, task_type="CAUSAL_LM"
    )
    report = check_vllm(_reference_adapter(tmp_path / "peft", config))
    assert report.accepted, report
    assert report.modules == sorted(projections) and report.rank == 16 and report.max_lora_rank == 16
    assert _levels(report) == {("note", "rslora")}  # vLLM scales by alpha / sqrt(r) as well
    assert report.command().endswith("--max-lora-rank 16")


def test_an_odd_rank_passes_with_the_next_max_lora_rank(tmp_path):
    # vLLM's only rank rule is r <= --max-lora-rank; 12 fits the default 16 and needs no flag
    report = check_vllm(_lora(tmp_path, r=12, lora_alpha=12))
    assert report.accepted and report.rank == 12 and report.findings == []
    assert report.command().endswith("--max-lora-rank 16")
    assert 12 not in MAX_LORA_RANKS


def test_a_rank_above_the_default_needs_the_flag(tmp_path):
    report = check_vllm(_lora(tmp_path, r=40, lora_alpha=40))
    assert report.accepted and report.max_lora_rank == 64
    rank = _only(report, "rank")
    assert rank.level == "warning" and "above vLLM's default --max-lora-rank 16" in rank.problem
    assert "--max-lora-rank 64" in rank.fix and report.command().endswith("--max-lora-rank 64")


def test_a_rank_pattern_sets_the_rank_and_a_different_scaling_warns(tmp_path):
    report = check_vllm(_lora(tmp_path, rank_pattern={"q_proj": 32}))
    assert report.accepted and report.rank == 32 and report.max_lora_rank == 32
    patterns = _only(report, "patterns")
    assert patterns.level == "warning" and "q_proj" in patterns.problem  # 16/32 != 16/8 there
    same = check_vllm(_lora(tmp_path, "same", rank_pattern={"q_proj": 32}, alpha_pattern={"q_proj": 64}))
    assert _only(same, "patterns").level == "note"  # 64/32 == 16/8: every vLLM serves it right


# -- what vLLM refuses -------------------------------------------------------------------------------


def test_dora_is_refused_with_convert_as_the_fix(tmp_path):
    from peft import LoraConfig

    directory = _reference_adapter(
        tmp_path / "dora", LoraConfig(r=8, target_modules=["q_proj"], use_dora=True)
    )
    report = check_vllm(directory)
    assert not report.accepted and _levels(report) == {("error", "dora")}  # the magnitude tensors not again
    assert f"peftkit convert {directory.resolve()} --to lora" in _only(report, "dora").fix
    assert report.command() is None and "vLLM would refuse this adapter: 1 error(s)" in str(report)


def test_trained_biases_and_lora_bias_are_refused(tmp_path):
    report = check_vllm(_lora(tmp_path, "bias", bias="all"))
    assert _levels(report) == {("error", "bias")}
    assert 'bias: "all"' in _only(report, "bias").problem and "peftkit merge" in _only(report, "bias").fix
    report = check_vllm(_lora(tmp_path, "lora_bias", lora_bias=True))
    assert _levels(report) == {("error", "lora_bias")}


def test_modules_to_save_is_refused_but_a_classifier_head_only_warns(tmp_path):
    report = check_vllm(_lora(tmp_path, "head", modules_to_save=["lm_head"]))
    assert _levels(report) == {("error", "modules_to_save")}  # its lm_head tensors are not reported twice
    fix = _only(report, "modules_to_save").fix
    assert "peftkit merge" in fix and "LoRA target instead" in fix
    score = _edit_config(_lora(tmp_path, "score"), modules_to_save=["score"])
    report = check_vllm(score)
    assert report.accepted and _only(report, "modules_to_save").level == "warning"


def test_a_rank_above_512_is_refused(tmp_path):
    directory = tmp_path / "huge"
    directory.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.zeros(600, 32),
        f"{prefix}.lora_B.weight": torch.zeros(32, 600),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 600, "lora_alpha": 600, "target_modules": ["q_proj"], "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    report = check_vllm(directory)
    rank = _only(report, "rank")
    assert rank.level == "error" and "above 512" in rank.problem and "--rank 512" in rank.fix
    assert report.max_lora_rank is None and not report.accepted


class _Convolutional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_a_convolution_target_is_refused_and_a_module_outside_the_layers_warns(tmp_path):
    model = _Convolutional()
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["conv", "head"]))
    peftkit.save_adapter(model, tmp_path / "conv")
    report = check_vllm(tmp_path / "conv")
    targets = [f for f in report.findings if f.check == "targets"]
    assert [f.level for f in targets] == ["error", "warning"]
    assert (
        "LoRA on convolutions (conv)" in targets[0].problem
        and "outside the repeated layers (head)" in targets[1].problem
    )
    assert not report.accepted


def test_lm_head_and_embed_tokens_targets(tmp_path):
    report = check_vllm(_lora(tmp_path, target_modules=["q_proj", "lm_head", "embed_tokens"]))
    assert report.accepted and report.modules == ["embed_tokens", "lm_head", "q_proj"]
    assert _levels(report) == {("warning", "targets"), ("note", "targets")}
    assert any("LoRA on lm_head" in f.problem for f in report.findings)


@pytest.mark.parametrize(
    ("method", "fix"),
    [
        (
            peftkit.IA3Config(
                target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
            ),
            "--to lora",
        ),
        (peftkit.PromptTuningConfig(num_virtual_tokens=4), "soft prompts"),
    ],
    ids=["ia3", "prompt-tuning"],
)
def test_other_methods_are_refused(tmp_path, method, fix):
    report = check_vllm(_peftkit_adapter(tmp_path / "other", method))
    finding = _only(report, "method")
    assert finding.level == "error" and "vLLM serves LoRA only" in finding.problem
    assert fix in finding.fix + finding.problem and not report.accepted


def test_a_reference_library_loha_is_refused(tmp_path):
    from peft import LoHaConfig

    report = check_vllm(_reference_adapter(tmp_path / "loha", LoHaConfig(r=4, target_modules=["q_proj"])))
    assert report.peft_type == "LOHA" and _levels(report) == {("error", "method")}
    assert "peftkit convert" in _only(report, "method").fix


def test_base_rewriting_inits_trained_tokens_and_missing_weights_are_refused(tmp_path):
    report = check_vllm(_edit_config(_lora(tmp_path, "pissa"), init_lora_weights="pissa_niter_4"))
    assert _levels(report) == {("error", "init")} and "portable=True" in _only(report, "init").fix
    report = check_vllm(_lora(tmp_path, "tokens", trainable_token_indices=[96, 97]))
    assert _levels(report) == {("error", "trainable_tokens")}  # its tensors are not reported twice
    empty = _lora(tmp_path, "empty")
    (empty / "adapter_model.safetensors").unlink()
    assert _levels(check_vllm(empty)) == {("error", "weights")}


def test_a_config_without_peft_type_is_read_as_lora_and_one_without_r_is_refused(tmp_path):
    directory = _lora(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["peft_type"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    report = check_vllm(directory)
    assert report.accepted and _levels(report) == {("warning", "config")}  # vLLM never reads peft_type
    del config["lora_alpha"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    assert ("error", "config") in _levels(check_vllm(directory))


def test_tensors_vllm_cannot_parse_are_refused(tmp_path):
    directory = _lora(tmp_path)
    save_file(
        {"base_model.model.model.norm.weight": torch.ones(32)}, str(directory / "adapter_model.safetensors")
    )
    finding = _only(check_vllm(directory), "tensors")
    assert finding.level == "error" and "base_model.model.model.norm.weight" in finding.problem


# -- run directories ----------------------------------------------------------------------------------


def test_a_run_directory_is_checked_through_its_adapter(tmp_path):
    run = tmp_path / "runs" / "instruct-lora"
    _lora(run, "adapter")
    (run / "config.yaml").write_text("task: causal-lm\n")
    report = check_vllm(run)
    assert report.directory == (run / "adapter").resolve() and report.name == "instruct-lora"
    assert (
        report.command()
        .split("--lora-modules ")[1]
        .startswith(f"instruct-lora={(run / 'adapter').resolve()}")
    )
    _edit_config(run / "adapter", use_dora=True)
    fix = _only(check_vllm(run), "dora").fix
    assert (
        f"peftkit merge {run} OUT_DIR" in fix and f"peftkit convert {run} --to lora" in fix
    )  # the run's base


def test_an_unfinished_run_is_checked_through_its_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _lora(run / "checkpoints" / "step-4", "adapter")
    (run / "config.yaml").write_text("task: causal-lm\n")
    assert check_vllm(run).directory == (run / "checkpoints" / "step-4" / "adapter").resolve()


def test_a_full_fine_tuning_run_and_a_missing_directory_say_what_to_give(tmp_path):
    run = tmp_path / "full"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("task: causal-lm\n")
    with pytest.raises(FileNotFoundError, match="full fine-tuning run: it has no adapter.*vllm serve"):
        check_vllm(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_vllm(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no adapter: no adapter_config.json"):
        check_vllm(tmp_path)


# -- the command line --------------------------------------------------------------------------------


def test_export_check_vllm_exit_codes(tmp_path, capsys):
    good = _lora(tmp_path, "good")
    assert main(["export", "--check", "vllm", str(good)]) == 0
    assert "vllm serve org/tiny-llama --enable-lora --lora-modules good=" in capsys.readouterr().out
    bad = _lora(tmp_path, "bad", use_dora=True)
    assert main(["export", "--check", "vllm", str(bad), "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["accepted"] is False and printed["command"] is None
    assert [(f["level"], f["check"]) for f in printed["findings"]] == [("error", "dora")]
    assert main(["export", "--check", "vllm", str(good), "--name", "my adapter", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["command"].split()[5].startswith("my-adapter=")


def test_export_usage_errors_exit_with_2(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "peftkit export: error: say what to export for: `peftkit export --check vllm ADAPTER_DIR`" in err
    assert "peftkit merge RUN_DIR OUT_DIR" in err
    missing = str(tmp_path / "nope")
    assert main(["export", "--check", "vllm", missing]) == 2
    assert f"{missing!r} does not exist" in capsys.readouterr().err
    assert main(["export", "--check", "vllm", str(tmp_path)]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert main(["export", "--check", "vllm"]) == 2
    assert main(["export", "--check", "tgi", str(tmp_path)]) == 2  # argparse: invalid choice
