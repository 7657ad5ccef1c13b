"""The reference library's small custom models (peft's tests/test_custom_models.py: their module names and
shapes) and a both-ways parity check on them, for methods whose tests replay that matrix's cases.

"peftkit->peft": trained by peftkit, saved with ``peftkit.save_adapter``, loaded by
``peft.PeftModel.from_pretrained``; "peft->peftkit": trained by peft, saved with ``save_pretrained``, loaded
by ``peftkit.load_adapter``. Outputs are then compared unmerged and merged (see :func:`assert_parity`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import peftkit

ATOL = 1e-5
STEPS, LR = 4, 2e-2
DIRECTIONS = ["peftkit->peft", "peft->peftkit"]


class MLP(nn.Module):
    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, hidden)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(hidden, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x)))))


class MLP2(MLP):
    """The same MLP with 32 hidden features (room for butterfly factors)."""

    def __init__(self) -> None:
        super().__init__(hidden=32)


class Conv2d(nn.Module):
    """The input reshaped into 5-channel 3x3 images, a 5 -> 10 conv with a 3x3 kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv2d(x.reshape(-1, 5, 3, 3)))
        return self.sm(self.lin0(self.flat(h)))


class Conv2d2(nn.Module):
    """A linear layer reshaped into 8-channel 3x3 images, an 8 -> 32 conv with a 3x3 kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 40)
        self.conv2d = nn.Conv2d(8, 32, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.lin0(x)).reshape(-1, 8, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class EmbConv1D(nn.Module):
    """An embedding of 100 tokens into 5 features, then GPT-2's Conv1D 5 -> 1 on each position.

    The reference feeds this model token ids; the harness feeds every model the same float batch, so the
    ids are drawn from it (any ids below 100 exercise the same layers)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x * 1000).long().remainder(100) if x.is_floating_point() else x
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(ids))))))


class Conv1d(nn.Module):
    """The input as one 10-step channel, a 1 -> 1 conv with a kernel of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(x.reshape(-1, 1, 10))))))


class Conv3d(nn.Module):
    """The input stacked three times into 5-channel 3x3x3 volumes, a 5 -> 10 conv with a 3x3x3 kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.stack([x] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv3d(h)))))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "MLP2": MLP2,
    "Conv2d": Conv2d,
    "Conv2d2": Conv2d2,
    "EmbConv1D": EmbConv1D,
    "Conv1d": Conv1d,
    "Conv3d": Conv3d,
}


def base(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_id]().eval()


def inputs(seed: int) -> torch.Tensor:
    """A batch of 9 rows of 10 features, as the reference's matrix feeds every model here."""
    return torch.randn(9, 10, generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module) -> None:
    """A few AdamW steps pushing the log-probability of class 0 up; leaves the model in eval mode."""
    torch.manual_seed(2)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        model(inputs(10 + step))[..., 0].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs(1))


def pair(
    direction: str, model_id: str, ours_config, theirs_config, directory: Path
) -> tuple[nn.Module, nn.Module]:
    """(peftkit model, peft model) holding the same trained adapter, moved across in ``direction``."""
    import peft

    torch.manual_seed(0)
    if direction == "peftkit->peft":
        ours = peftkit.inject(base(model_id), ours_config)
        train(ours)
        peftkit.save_adapter(ours, directory)
        theirs = peft.PeftModel.from_pretrained(base(model_id), directory).eval()
    else:
        theirs = peft.get_peft_model(base(model_id), theirs_config)
        train(theirs)
        theirs.save_pretrained(directory)
        ours = peftkit.load_adapter(base(model_id), directory).eval()
    return ours, theirs


def assert_close(ours: nn.Module, theirs: nn.Module, reference: torch.Tensor, what: str) -> None:
    a, b = out(ours), out(theirs)
    assert (a - reference).abs().max() > 1e-3, f"{what}: the adapter does not change the output"
    assert (a - b).abs().max() <= ATOL, f"{what}: peftkit vs peft max abs diff {(a - b).abs().max():.3e}"


def assert_parity(direction: str, model_id: str, ours_config, theirs_config, directory: Path) -> None:
    """Both libraries give the same outputs with the adapter moved across: unmerged, merged in place, and
    merged and unloaded."""
    reference = out(base(model_id))
    ours, theirs = pair(direction, model_id, ours_config, theirs_config, directory)
    assert_close(ours, theirs, reference, "unmerged")
    peftkit.merge(ours, safe=True)
    theirs.merge_adapter()
    assert_close(ours, theirs, reference, "merged")
    assert_close(
        peftkit.unload(ours, merge=True), theirs.merge_and_unload(), reference, "merged and unloaded"
    )


def assert_same_fresh_adapter(
    ours: nn.Module,
    theirs: nn.Module,
    ours_config,
    directory: Path,
    keys,
    *,
    dtypes: bool = False,
    ignore: tuple[str, ...] = (),
    config_keys: bool = True,
) -> None:
    """A fresh adapter from the same config, injected by peftkit (``ours``) and by the reference (``theirs``):
    the same tensor names and shapes (and dtypes with ``dtypes``), each library reads the other's
    adapter_config.json without a warning (but those matching a message in ``ignore``), and the config fields
    ``keys`` are equal in both readings, the reference's file and (with ``config_keys``) the config itself."""
    import json
    import warnings

    import peft
    from peft.utils import get_peft_model_state_dict

    def layout(state):
        return {k: (tuple(v.shape), v.dtype) if dtypes else tuple(v.shape) for k, v in state.items()}

    assert layout(peftkit.adapter_state_dict(ours)) == layout(get_peft_model_state_dict(theirs))
    peftkit.save_adapter(ours, directory / "ours")
    theirs.save_pretrained(directory / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither library meets a key it does not know
        for message in ignore:
            warnings.filterwarnings("ignore", message, UserWarning)
        read_theirs = peft.PeftConfig.from_pretrained(directory / "ours")
        read_ours = peftkit.read_adapter_config(directory / "theirs")
    written = json.loads((directory / "theirs" / "adapter_config.json").read_text())
    for key in keys:
        assert getattr(read_theirs, key) == getattr(read_ours, key) == written[key], key
        assert not config_keys or getattr(ours_config, key) == written[key], key
