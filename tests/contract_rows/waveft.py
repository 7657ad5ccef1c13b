"""WaveFT: zero coefficients (starts at the base) with the Haar and a longer wavelet, random ones, and the
sparse variant without the inverse transform, on Linear and Conv1D."""

from contract_rows import Row
from peftkit.methods.waveft import WaveFTConfig

KINDS = ["Linear", "Conv1D"]  # the reference library's WaveFT layer kinds

VARIANTS = {
    "waveft": {},
    "waveft-sym2": {"wavelet_family": "sym2"},
    "waveft-random": {"init_weights": False, "wavelet_family": "db3"},
    "waveft-sparse": {"use_idwt": False},
}


def _config(options):
    # 6 x 5 layers: 12 of their 30 coefficients train
    return lambda kind: WaveFTConfig(
        n_frequency=12, scaling=10.0, target_modules=["layer"], modules_to_save=["head"], **options
    )


ROWS = [
    Row(name=name, config=_config(options), kinds=KINDS, starts_at_base=name != "waveft-random")
    for name, options in VARIANTS.items()
]
