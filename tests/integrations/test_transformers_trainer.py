"""transformers' ``Trainer`` on a peftkit-adapted model: ``PeftkitTrainer`` end to end (issue 18 item 2).

Tiny models from configs, a few CPU steps each: adapter-only checkpoints, a run killed after a checkpoint
and resumed in a fresh model and trainer (bit-identical to an uninterrupted run), the best checkpoint
loaded at the end, evaluation and ``label_names`` on a non-transformers model, ``remove_unused_columns``,
reentrant gradient checkpointing over a frozen base, and the optimizer's groups (LoRA+).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertForSequenceClassification,
    Trainer,
    ViTConfig,
    ViTForImageClassification,
)

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.errors import AdapterNameError, ConfigError
from peftkit.integrations.transformers_trainer import PeftkitTrainer
from support.trainer import VOCAB, Records, arguments, tiny_bert

CHILD = Path(__file__).with_name("_trainer_child.py")


def adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peftkit.adapter_state_dict(model).items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_checkpoints_hold_only_the_adapter_and_a_killed_run_resumes_to_the_same_weights(tmp_path):
    # tests/integrations/_trainer_child.py: an uninterrupted run, a run SIGKILLed after checkpoint-3, and a new model and
    # trainer resuming it (one interpreter, one thread, so the runs compute alike)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["killed_by"] == signal.SIGKILL and results["left"] == ["checkpoint-3"]
    assert results["global_step"] == 6 and results["optimizer_holds_the_model_parameters"]
    # the resumed model started from another adapter init: only a bit-exact restore gives the same end
    assert_identical(load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "full.safetensors"))

    checkpoint = tmp_path / "killed" / "checkpoint-3"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
    } <= set(files), files
    assert not [f for f in files if f.startswith("model") or f == "config.json"], files
    size = (checkpoint / "adapter_model.safetensors").stat().st_size
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_bert().parameters() if not p.requires_grad)
    assert size < 40_000 and size < base_bytes / 5, (size, base_bytes)
    assert load_file(checkpoint / "adapter_model.safetensors").keys() == adapter(tiny_bert()).keys()


def test_every_adapter_of_a_checkpoint_is_restored(tmp_path):
    model = tiny_bert()
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["key"]), "other")
    peftkit.set_active(model, "default")
    trainer = PeftkitTrainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Records())
    trainer.train()
    assert (tmp_path / "checkpoint-3" / "other" / "adapter_model.safetensors").exists()
    saved = {
        name: {k: v.clone() for k, v in peftkit.adapter_state_dict(model, name).items()}
        for name in ("default", "other")
    }
    with torch.no_grad():  # the live tensors (the state dict's are views of them) change after the save
        for name in saved:
            for tensor in peftkit.adapter_state_dict(model, name).values():
                tensor.add_(1.0)
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-3"))
    for name in saved:
        assert_identical(dict(peftkit.adapter_state_dict(model, name)), saved[name])


def test_load_best_model_at_end_puts_the_best_adapter_into_the_live_model(tmp_path):
    scores = iter([0.2, 0.9, 0.4])  # evaluations at steps 2, 4, 6: step 4 is the best

    def metrics(prediction):
        assert prediction.label_ids is not None and prediction.predictions.shape[-1] == 2
        return {"score": next(scores)}

    model = tiny_bert()
    args = arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        save_total_limit=2,
    )
    trainer = PeftkitTrainer(
        model=model,
        args=args,
        train_dataset=Records(),
        eval_dataset=Records(8, seed=3),
        compute_metrics=metrics,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in best)
    assert_identical(adapter(model), best)


class Tagger(nn.Module):
    """Not a transformers model: its own forward arguments, labels named ``target``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.proj(self.embed(input_ids).mean(1))))
        out = {"logits": logits}
        if target is not None:
            out["loss"] = nn.functional.cross_entropy(logits, target)
        return out


class TaggerRecords(Records):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "target": self.labels[i]}


def test_evaluation_and_label_names_on_a_model_of_any_class(tmp_path):
    torch.manual_seed(0)
    model = peftkit.inject(
        Tagger(), peftkit.LoraConfig(r=4, target_modules=["proj"], modules_to_save=["head"])
    )

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    data = TaggerRecords(16, seed=3)
    trainer = PeftkitTrainer(
        model=model,
        args=arguments(tmp_path, label_names=["target"], max_steps=3),
        train_dataset=TaggerRecords(),
        eval_dataset=data,
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy"} <= set(after) and after["eval_loss"] != before["eval_loss"]
    predicted = trainer.predict(data)
    assert torch.equal(torch.as_tensor(predicted.label_ids), data.labels)

    trainer.save_model(
        tmp_path / "final"
    )  # a plain nn.Module: Trainer alone would write its whole state dict
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.bin",
    ]
    torch.manual_seed(0)
    fresh = peftkit.load_adapter(Tagger(), tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(data.ids)["logits"], model.eval()(data.ids)["logits"])


def test_label_names_and_remove_unused_columns_work_as_with_a_plain_model(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = Records()
    table = datasets.Dataset.from_dict(
        {
            "input_ids": records.ids.tolist(),
            "labels": records.labels.tolist(),
            "text": ["unused"] * len(records),
            "idx": list(range(len(records))),  # idx would break forward()
        }
    )

    def batch_keys(trainer: Trainer) -> list[str]:
        return sorted(next(iter(trainer.get_train_dataloader())))

    bare = BertForSequenceClassification(tiny_bert().config)
    for remove in (True, False):
        args = arguments(tmp_path / str(remove), max_steps=2, remove_unused_columns=remove)
        plain = Trainer(model=bare, args=args, train_dataset=table)
        model = tiny_bert()
        trainer = PeftkitTrainer(model=model, args=args, train_dataset=table)
        assert trainer.label_names == plain.label_names == ["labels"]
        assert trainer.can_return_loss == plain.can_return_loss
        assert batch_keys(trainer) == batch_keys(plain)
        assert ("idx" in batch_keys(trainer)) is not remove
        before = adapter(model)
        trainer.train()
        assert any(not torch.equal(before[k], v) for k, v in adapter(model).items())


def tiny_vit() -> ViTForImageClassification:
    """``main_input_name`` is ``pixel_values``: transformers enables input grads for ``input_ids`` models only."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=2,
    )
    model = ViTForImageClassification(config)
    return peftkit.inject(
        model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    )


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        generator = torch.Generator().manual_seed(4)
        self.pixels = torch.randn(n, 3, 8, 8, generator=generator)
        self.labels = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the plain Trainer's run, below
def test_reentrant_gradient_checkpointing_over_a_frozen_base_trains_every_adapter(tmp_path):
    reentrant = {
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": True},
        "max_steps": 2,
        "save_strategy": "no",
    }
    reference = tiny_vit()
    PeftkitTrainer(
        model=reference,
        args=arguments(tmp_path / "r", max_steps=2, save_strategy="no"),
        train_dataset=Images(),
    ).train()

    model = tiny_vit()
    PeftkitTrainer(model=model, args=arguments(tmp_path / "c", **reentrant), train_dataset=Images()).train()
    b = {k: v for k, v in adapter(model).items() if "lora_B" in k}
    assert all(v.abs().sum() > 0 for v in b.values()), (
        "an adapter inside a checkpointed block got no gradient"
    )
    ours, theirs = adapter(model), adapter(reference)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)

    # what the subclass prevents: the plain Trainer trains the head and, silently, no adapter at all
    plain = tiny_vit()
    Trainer(model=plain, args=arguments(tmp_path / "p", **reentrant), train_dataset=Images()).train()
    assert all(v.abs().sum() == 0 for k, v in adapter(plain).items() if "lora_B" in k)


def test_the_optimizer_covers_trainable_parameters_in_lora_plus_groups(tmp_path):
    model = tiny_bert()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    plain = PeftkitTrainer(model=model, args=arguments(tmp_path, weight_decay=0.01))
    assert {id(p) for g in plain.create_optimizer().param_groups for p in g["params"]} == trainable

    model = tiny_bert()
    trainer = PeftkitTrainer(
        model=model,
        args=arguments(tmp_path, weight_decay=0.01, optim="adamw_torch"),
        train_dataset=Records(),
        lora_plus_ratio=16,
    )
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert {id(p) for g in groups.values() for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    b_ids = {id(layer.adapters["default"].lora_B.weight) for _, layer in adapter_layers(model)}
    assert {id(p) for p in groups["lora_plus_B_decay"]["params"]} == b_ids
    assert groups["lora_plus_B_decay"]["lr"] == pytest.approx(16 * 5e-3)
    assert groups["lora_plus_A_decay"]["lr"] == pytest.approx(5e-3)
    assert groups["lora_plus_other_no_decay"]["weight_decay"] == 0.0  # the head's bias
    trainer.train()  # the scheduler scales each group from its own rate
    assert trainer.optimizer.param_groups[0]["initial_lr"] in (5e-3, 16 * 5e-3)


def test_models_the_trainer_cannot_train_as_they_are_are_refused(tmp_path):
    torch.manual_seed(0)
    bare = BertForSequenceClassification(tiny_bert().config)
    with pytest.raises(AdapterNameError, match="peftkit.inject"):
        PeftkitTrainer(model=bare, args=arguments(tmp_path))
    adalora = peftkit.inject(
        BertForSequenceClassification(tiny_bert().config),
        peftkit.AdaLoraConfig(target_modules=["query"], total_step=10),
    )
    with pytest.raises(ConfigError, match="training hook"):
        PeftkitTrainer(model=adalora, args=arguments(tmp_path))
    with pytest.raises(ConfigError, match="optimizers= passed one"):
        model = tiny_bert()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        PeftkitTrainer(model=model, args=arguments(tmp_path), optimizers=(optimizer, None), lora_plus_ratio=4)


def test_model_init_must_build_an_adapted_model(tmp_path):
    trainer = PeftkitTrainer(
        model_init=lambda: tiny_bert(),
        args=arguments(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=Records(),
    )
    trainer.train()
    assert peftkit.adapter_names(trainer.model) == ["default"]
    with pytest.raises(AdapterNameError, match="peftkit.inject"):  # Trainer calls model_init at once
        PeftkitTrainer(
            model_init=lambda: BertForSequenceClassification(tiny_bert().config),
            args=arguments(tmp_path, max_steps=1),
            train_dataset=Records(),
        )


def test_the_final_save_loads_in_the_reference_library(tmp_path):
    model = tiny_bert()
    trainer = PeftkitTrainer(
        model=model, args=arguments(tmp_path, max_steps=3, save_strategy="no"), train_dataset=Records()
    )
    trainer.train()
    trainer.save_model(tmp_path / "final")
    assert not os.path.exists(tmp_path / "final" / "model.safetensors")
    ids = Records(4, seed=5).ids
    torch.manual_seed(0)
    base = BertForSequenceClassification(model.config)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-6
        )
