"""LoRA's data-aware and quantization-aware inits: LoRA-GA, EVA, CorDA (IPM and KPM) and LoftQ.

LoRA-GA, EVA and CorDA start from data, through the config's hooks (``inject_with_data``, the example
input as the data); they read a weight matrix, so they run on the matrix kinds (the others are refused,
see test_errors.py). LoftQ quantizes ``nn.Linear`` weights as bitsandbytes stores them.
"""

import torch
from torch import nn

from contract_rows import Row, inject_with_data
from contract_rows.lora import lora_row_config
from peftkit.core import registry
from support.tiny import MATRIX_KINDS, Net, build


def _config(init, **options):
    return lora_row_config(init, options)


def _build_wide(kind: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    """A Linear with 64 inputs (4-bit LoftQ quantizes in_features in blocks of 64), else ``build``."""
    if kind != "Linear64":
        return build(kind, seed)
    torch.manual_seed(seed)
    layer, x = nn.Linear(64, 5), torch.randn(4, 64)
    return Net(layer, x), x


ROWS = [
    Row(
        name="lora-lora_ga",
        config=_config("lora_ga"),
        kinds=sorted(MATRIX_KINDS),
        rewrites_base=True,
        inject=inject_with_data,
        # a plain save belongs on the offset base W - s B0 A0 (the gradients that made the offset are gone,
        # so loading cannot redo it; docs/lora.md); the file for the original base is the portable one
        save_portable=True,
        load_tol=1e-5,
    ),
    Row(
        name="lora-eva",
        config=_config("eva"),
        kinds=sorted(MATRIX_KINDS),
        inject=inject_with_data,
    ),
    *(
        Row(
            name=f"lora-corda-{mode}",
            config=_config("corda", corda_config={"corda_method": mode}),
            kinds=sorted(MATRIX_KINDS),
            rewrites_base=True,
            inject=inject_with_data,
            load_tol=1e-5,  # always saved portable: the data it decomposed with is not in the file
        )
        for mode in ("ipm", "kpm")
    ),
]
# LoftQ quantizes with bitsandbytes (the `quantization` extra), as tests/backends/ and
# tests/methods/test_lora_loftq.py need it too: its rows exist where it is installed.
if registry.quantizer(4) is not None and registry.quantizer(8) is not None:
    ROWS += [
        Row(
            name=f"lora-loftq-{bits}bit",
            config=_config("loftq", loftq_config={"loftq_bits": bits, "loftq_iter": 2}),
            kinds=[kind],
            build=_build_wide,
            rewrites_base=True,
            # The base becomes its quantization Q, and unload keeps Q (lora.py, detach_from): Q is the
            # base the adapter was made to complete (the reference keeps it too), and holding W as well
            # would double the model's memory.
            unload_restores=False,
            # Q + s B A is W up to what a rank-r fit of W - Q leaves: close to the base, not at it
            starts_at_base=False,
        )
        for bits, kind in ((8, "Linear"), (4, "Linear64"))
    ]
