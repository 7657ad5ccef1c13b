"""peftkit: parameter-efficient fine-tuning of pretrained PyTorch models.

The public verbs take your own ``nn.Module``, change it in place and return it::

    import peftkit
    model = peftkit.inject(model, peftkit.LoraConfig(r=8, target_modules=["query", "value"]))
    peftkit.trainable_summary(model)
    ...train...
    peftkit.save_adapter(model, "my-adapter")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule defining it. Names are imported on first use (PEP 562) so that
# `import peftkit` alone, and with it `peftkit --help`, does not pay seconds for torch and transformers.
_EXPORTS = {
    **dict.fromkeys(
        [
            "TrainableSummary",
            "active_adapters",
            "adapter_config",
            "adapter_names",
            "adapter_state_dict",
            "delete_adapter",
            "disable",
            "inject",
            "load_adapter",
            "load_adapter_state_dict",
            "make_config",
            "merge",
            "read_adapter_config",
            "save_adapter",
            "set_active",
            "trainable_summary",
            "unload",
            "unmerge",
            "quantize",
            "prepare_for_kbit_training",
            "merge_report",
            "QuantizedMergeWarning",
            "per_example_adapters",
        ],
        "api",
    ),
    "AdapterConfig": "core.config",
    "AdaLoraConfig": "methods.adalora",
    "AdaLoraController": "methods.adalora",
    "BitFitConfig": "methods.bitfit",
    "BottleneckConfig": "methods.bottleneck",
    "IA3Config": "methods.ia3",
    "LNTuningConfig": "methods.ln_tuning",
    "LoHaConfig": "methods.loha",
    "LoKrConfig": "methods.lokr",
    "LoraConfig": "methods.lora",
    "lora_plus_param_groups": "methods.lora",
    "OFTConfig": "methods.oft",
    "PrefixTuningConfig": "methods.prefix_tuning",
    "PromptEncoderConfig": "methods.p_tuning",
    "PromptTuningConfig": "methods.prompt_tuning",
    "VeraConfig": "methods.vera",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:  # a submodule not imported yet (`peftkit.errors`), as the eager package used to offer
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    importlib.import_module(f"{__name__}.api")  # registers every built-in method, as before
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__version__"})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .api import (
        QuantizedMergeWarning,
        TrainableSummary,
        active_adapters,
        adapter_config,
        adapter_names,
        adapter_state_dict,
        delete_adapter,
        disable,
        inject,
        load_adapter,
        load_adapter_state_dict,
        make_config,
        merge,
        merge_report,
        per_example_adapters,
        prepare_for_kbit_training,
        quantize,
        read_adapter_config,
        save_adapter,
        set_active,
        trainable_summary,
        unload,
        unmerge,
    )
    from .core.config import AdapterConfig
    from .methods.adalora import AdaLoraConfig, AdaLoraController
    from .methods.bitfit import BitFitConfig
    from .methods.bottleneck import BottleneckConfig
    from .methods.ia3 import IA3Config
    from .methods.ln_tuning import LNTuningConfig
    from .methods.loha import LoHaConfig
    from .methods.lokr import LoKrConfig
    from .methods.lora import LoraConfig, lora_plus_param_groups
    from .methods.oft import OFTConfig
    from .methods.p_tuning import PromptEncoderConfig
    from .methods.prefix_tuning import PrefixTuningConfig
    from .methods.prompt_tuning import PromptTuningConfig
    from .methods.vera import VeraConfig

__all__ = [
    "AdaLoraConfig",
    "AdaLoraController",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "VeraConfig",
    "QuantizedMergeWarning",
    "TrainableSummary",
    "active_adapters",
    "adapter_config",
    "adapter_names",
    "adapter_state_dict",
    "delete_adapter",
    "disable",
    "inject",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_plus_param_groups",
    "make_config",
    "merge",
    "merge_report",
    "per_example_adapters",
    "prepare_for_kbit_training",
    "quantize",
    "read_adapter_config",
    "save_adapter",
    "set_active",
    "trainable_summary",
    "unload",
    "unmerge",
]
