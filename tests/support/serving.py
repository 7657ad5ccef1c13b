"""A tiny Llama with a chat template, LoRA adapters that visibly change it, and a server on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import peftkit
from support.generation import llama_with_pairs

TARGETS = ["q_proj", "v_proj", "down_proj"]


def base_and_adapters(tmp_path: Path, names: Sequence[str]) -> tuple[Path, Path]:
    """A saved tiny Llama (character tokenizer, chat template) and ``adapters/NAME`` for every name: LoRA
    adapters with random, enlarged factors, so that each adapter's greedy answers differ from the others'."""
    from transformers import AutoModelForCausalLM

    model_dir, _ = llama_with_pairs(tmp_path)
    adapters = tmp_path / "adapters"
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(100 + i)
        config = peftkit.LoraConfig(r=2 + 2 * (i % 3), target_modules=TARGETS, init_lora_weights=False)
        peftkit.inject(model, config)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.mul_(3)
        peftkit.save_adapter(model, adapters / name)
    return model_dir, adapters


def alone(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of ``prompt_ids`` from the base with only that adapter, by transformers' generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        peftkit.load_adapter(model, adapter_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free local port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
