"""Tasks are built from the run-config sections they read, as keywords, never from the whole run config."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from peftkit.run.runner import build_task
from peftkit.run.schema import RunConfig
from peftkit.tasks import registered_tasks, task_class

BUILT_IN = ["causal-lm", "image-classification", "seq2seq", "text-classification"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_task_takes_exactly_the_sections_it_names(name):
    cls = task_class(name)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(cls.sections) <= fields - {"task", "select", "output_dir"}
    keywords = [
        p.name for p in inspect.signature(cls).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert sorted(keywords) == sorted(cls.sections)
    cls()  # every section defaults to the run config's own default


def test_build_task_hands_over_the_sections_themselves():
    config = RunConfig(task="seq2seq")
    task = build_task(config)
    assert task.model_config is config.model and task.data is config.data
    assert task.eval is config.eval and task.generation is config.generation


def test_the_image_task_sets_the_head_to_train_in_the_run_adapter_section():
    config = RunConfig(task="image-classification")
    build_task(config)
    assert config.adapter == {"method": "lora", "modules_to_save": ["_fc"]}


def test_built_in_tasks_are_registered():
    assert set(BUILT_IN) <= set(registered_tasks())
