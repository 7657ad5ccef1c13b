"""peftkit: parameter-efficient fine-tuning of pretrained PyTorch models.

The public verbs take your own ``nn.Module``, change it in place and return it::

    import peftkit
    model = peftkit.inject(model, peftkit.LoraConfig(r=8, target_modules=["query", "value"]))
    peftkit.trainable_summary(model)
    ...train...
    peftkit.save_adapter(model, "my-adapter")
"""

from .api import (
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
from .methods.prompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .methods.vera import VeraConfig

__version__ = "0.1.0"

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
    "read_adapter_config",
    "save_adapter",
    "set_active",
    "trainable_summary",
    "unload",
    "unmerge",
]
