"""SHiRA: zero values (starts at the base) and random ones, on nn.Linear, the reference's one SHiRA kind."""

from contract_rows import Row
from peftkit.methods.shira import ShiraConfig


def _config(init_weights):
    # 6 -> 5 layer: r=1 trains 11 of its 30 entries
    return lambda kind: ShiraConfig(
        r=1, target_modules=["layer"], modules_to_save=["head"], init_weights=init_weights
    )


ROWS = [
    Row(name="shira", config=_config(True), kinds=["Linear"]),
    Row(name="shira-random", config=_config(False), kinds=["Linear"], starts_at_base=False),
]
