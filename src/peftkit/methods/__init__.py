"""PEFT methods, one file each. Importing this package registers every built-in method."""

from . import lora  # noqa: F401  (registers LoRA, with its rsLoRA / DoRA / init variants)
