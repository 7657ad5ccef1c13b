"""A recipe (RunConfig data) for the tiny BERT and reviews CSV that tests/conftest.py provides."""

from __future__ import annotations

from peftkit.run.config import parse_config


def make_config(model_dir, csv_path, out_dir, **sections):
    data = {
        "task": "text-classification",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "files": str(csv_path),
            "columns": {"text": "review", "label": "sentiment"},
            "max_length": 16,
            "split": {"validation": 0.2, "test": 0.2, "seed": 0},
        },
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
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
        "eval": {"batch_size": 16, "before_training": True},
        "output_dir": str(out_dir),
    }
    for section, values in sections.items():  # the adapter section is replaced, the others updated
        merge = isinstance(values, dict) and section != "adapter"
        data[section] = {**data.get(section, {}), **values} if merge else values
    return parse_config(data)
