"""``peftkit compare``: full fine-tuning and PEFT methods trained on the same task, data, split, step
budget and seeds, each measured the same way (quality, trainable parameters, artifact size, peak
memory, time, time to target, latency, forgetting), then reported side by side (``peftkit.report``)."""

from .config import CompareConfig, PlannedRun, load_compare_config, parse_compare_config
from .runner import CompareResult, read_record, run_comparison

__all__ = [
    "CompareConfig",
    "CompareResult",
    "PlannedRun",
    "load_compare_config",
    "parse_compare_config",
    "read_record",
    "run_comparison",
]
