"""Start each chosen LoRA adapter along the directions the probe paid for.

The scores value a rank-k adapter as if its k input directions were the probed gradient's best ones
(its top singular directions, ``scores.py``). LoRA's own init draws A at random, and a random row of A
overlaps a given direction by about ``1/sqrt(inputs)``: until training rotates A, a rank-1 adapter on a
module whose gradient is rank 1 (a BERT pooler's, say) captures almost none of what it was chosen for.
In the experiment (docs/select.md) starting A along those directions is what turned the selection from a
tie into a win on SmolLM2; on MiniLM it removed one stalled run and caused another.

So the rows of A are set to those directions, each scaled to the norm LoRA's own init gave that row
(the learning dynamics stay those of the recipe), and B stays zero: the model's outputs at step 0 are
exactly the base model's, nothing is subtracted from the base weights, and the saved adapter is
ordinary LoRA. This is the A half of LoRA-GA's init (Wang et al. 2024, arXiv:2407.05000), which also
sets B from the gradient's other side and so has to rewrite the base; with B = 0 the first AdamW step
moves B along ``G A^T``, the part of the gradient the selection paid for.

Embedding adapters are left as they are (their zero factor is A, so there is no input side to align).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.inject import adapter_layers
from ..errors import ConfigError

INIT_FILE = "init.safetensors"


def apply(model: nn.Module, directions: Mapping[str, torch.Tensor], adapter_name: str) -> int:
    """Set the A rows of ``adapter_name``'s LoRA layers named in ``directions`` (module name -> ``rank x
    inputs`` unit rows) and return how many modules were set.

    Raises:
        ConfigError: a named module has no LoRA adapter ``adapter_name``, or its A does not have the
            directions' shape (the directions were chosen for another model or selection).
    """
    layers = dict(adapter_layers(model))
    problems = []
    done = 0
    for name, rows in directions.items():
        layer = layers.get(name)
        adapter = (
            layer.adapters[adapter_name] if layer is not None and adapter_name in layer.adapters else None
        )
        a = getattr(getattr(adapter, "lora_A", None), "weight", None)
        if a is None:
            problems.append(f"{name}: no LoRA adapter {adapter_name!r} with an A matrix there")
            continue
        view = a.reshape(a.shape[0], -1)
        if tuple(view.shape) != tuple(rows.shape):
            problems.append(
                f"{name}: LoRA A is {tuple(view.shape)} (rank x inputs), the directions are "
                f"{tuple(rows.shape)}"
            )
            continue
        with torch.no_grad():
            norms = view.float().norm(dim=1, keepdim=True)
            unit = rows.float() / rows.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            a.copy_((unit * norms).reshape(a.shape).to(a.dtype))
        done += 1
    if problems:
        raise ConfigError(
            problems
            + [
                "the initial directions do not match this adapter: select again for "
                "this model and config (or drop select.init_from)"
            ],
            what="initial LoRA directions",
        )
    return done


def save(directions: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: rows.float().contiguous() for name, rows in directions.items()}, str(path))


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """The directions saved by :func:`save`.

    Raises:
        ConfigError: no such file, or not a safetensors file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [
                f"select.init_from: {str(path)!r} does not exist; it is the {INIT_FILE} that "
                "`peftkit select` writes beside selected.yaml (or set select.init_from: null)"
            ],
            what="run config",
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(
            [f"select.init_from: {str(path)!r} is not a safetensors file of LoRA directions ({exc})"],
            what="run config",
        ) from exc
