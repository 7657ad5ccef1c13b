"""Serving many adapters on one base under concurrent load: requests/s and p50/p99 latency.

For 1, 4 and 16 LoRA adapters, a closed loop of ``--concurrency`` clients sends ``--requests`` requests
(adapters round-robin) to three servers of the same model, in one process, the arms interleaved per
round:

- ``mixed``: peftkit's engine, rows of any adapters in one batch (``per_example_adapters``), continuous
  batching (what ``peftkit serve`` runs);
- ``switch``: the same engine with one adapter per batch, the active adapter switched between batches:
  serving each adapter by switching;
- ``peft``: the reference library, static batches of the waiting requests through ``adapter_names=``
  (``generate`` / forward), each batch run to its end before the next starts.

Generation uses the bundled SmolLM2-135M-Instruct (greedy, ``--max-tokens`` new tokens, chat prompts);
classification the bundled MiniLM (one text per request). The HTTP layer is left out of all three arms,
so the numbers compare the batching; ``--check`` also compares every greedy answer with the reference's.

    python -m benchmarks.serve --json benchmarks/results/serve-$(date +%Y%m%d).json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "Translate to French: good morning",
    "Name a colour.",
    "What is two plus two?",
    "Give a word that rhymes with cat.",
    "Say hello in Spanish.",
    "Name a fruit that is yellow.",
    "What is the capital of Italy?",
    "Write one word about the sea.",
]
TEXTS = [
    "a moving, clever film",
    "dull and far too long",
    "the plot was fine, the acting was not",
    "I laughed all the way through",
    "an awful, boring mess",
    "lovely photography and a great cast",
]


# -- the adapters -------------------------------------------------------------------------------------


def make_adapters(base: Any, count: int, out: Path, classify: bool) -> list[str]:
    """``count`` LoRA adapters with random (non-zero) factors on q and v, saved under ``out``."""
    import copy

    import peftkit

    targets = ["query", "value"] if classify else ["q_proj", "v_proj"]
    names = []
    for i in range(count):
        model = copy.deepcopy(base.model)
        torch.manual_seed(1000 + i)
        config = peftkit.LoraConfig(
            r=8,
            target_modules=targets,
            init_lora_weights=False,
            modules_to_save=["classifier"] if classify else None,
        )
        peftkit.inject(model, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.02 / max(param.std().item(), 1e-8))
        name = f"adapter-{i:02d}"
        peftkit.save_adapter(model, out / name)
        names.append(name)
    return names


# -- a closed loop of clients ----------------------------------------------------------------------


async def closed_loop(
    send, jobs: list[tuple[str, Any]], concurrency: int
) -> tuple[float, list[float], list[Any]]:
    """Run ``jobs`` (adapter, input) through ``send`` with ``concurrency`` clients; (seconds, latencies, answers)."""
    answers: list[Any] = [None] * len(jobs)
    latencies: list[float] = [0.0] * len(jobs)
    next_job = iter(range(len(jobs)))

    async def client() -> None:
        for index in next_job:
            start = time.perf_counter()
            answers[index] = await send(*jobs[index])
            latencies[index] = time.perf_counter() - start

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, answers


def engine_sender(engine: Any, pool: Any, base: Any, classify: bool, max_tokens: int):
    from peftkit.serve.decode import Sampling
    from peftkit.serve.engine import Job

    async def send(name: str, item: Any) -> Any:
        adapter = pool.find(name)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + 600
        if classify:
            job = Job("classify", adapter, deadline, loop, events, texts=[item])
        else:
            job = Job(
                "generate",
                adapter,
                deadline,
                loop,
                events,
                prompt=item,
                sampling=Sampling(max_tokens, temperature=0),
            )
        engine.submit(job)
        text = ""
        while True:
            _, event = await events.get()
            if event[0] == "text":
                text += event[1]
            elif event[0] == "done":
                return text
            elif event[0] == "result":
                return event[1][0]["label"]
            else:
                raise RuntimeError(event)

    return send


class ReferenceServer:
    """Static batching over the reference library: take what waits (up to ``max_batch``), run it to the end."""

    def __init__(self, model: Any, tokenizer: Any, classify: bool, max_batch: int, max_tokens: int) -> None:
        self.model, self.tokenizer, self.classify = model, tokenizer, classify
        self.max_batch, self.max_tokens = max_batch, max_tokens
        self.inbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    async def send(self, name: str, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.inbox.put((name, item, loop, future))
        return await future

    def _loop(self) -> None:
        while True:
            first = self.inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            answers = self._run([b[0] for b in batch], [b[1] for b in batch])
            for (_, _, loop, future), answer in zip(batch, answers):
                loop.call_soon_threadsafe(future.set_result, answer)

    def _run(self, names: list[str], items: list[Any]) -> list[Any]:
        with torch.inference_mode():
            if self.classify:
                batch = self.tokenizer(items, padding=True, truncation=True, return_tensors="pt")
                logits = self.model(**batch, adapter_names=names).logits
                labels = self.model.config.id2label
                return [labels[int(i)] for i in logits.argmax(-1)]
            width = max(len(p) for p in items)
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in items])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in items])
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=names,
                max_new_tokens=self.max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            return [self._text(row[width:]) for row in out]

    def _text(self, tokens: torch.Tensor) -> str:
        eos = set(
            self.model.generation_config.eos_token_id
            if isinstance(self.model.generation_config.eos_token_id, list)
            else [self.model.generation_config.eos_token_id]
        )
        kept = []
        for t in tokens.tolist():
            if t in eos:
                break
            kept.append(t)
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()


# -- one workload ------------------------------------------------------------------------------------


def workload(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import peft

    from peftkit.serve.adapters import AdapterPool
    from peftkit.serve.engine import Engine
    from peftkit.serve.model import load_base

    classify = kind == "classify"
    base = load_base(
        "minilm" if classify else "smollm2-135m-instruct", task="text-classification" if classify else None
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(base, max(args.adapters), Path(tmp), classify)
        pool = AdapterPool(base.model, base.id, max_resident=len(names))
        for name in names:
            pool.make_resident(pool.register(name, Path(tmp) / name))
        reference = base.task.load_model().eval()  # a second copy of the base, for the reference library
        reference = peft.PeftModel.from_pretrained(reference, Path(tmp) / names[0], adapter_name=names[0])
        for name in names[1:]:
            reference.load_adapter(Path(tmp) / name, adapter_name=name)
        reference.eval()
        inputs = TEXTS if classify else [base.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        samples: dict[tuple[int, str], list[tuple[float, list[float]]]] = {}
        agree = {}
        for round_index in range(args.rounds):
            for count in args.adapters:
                jobs = [(names[i % count], inputs[i % len(inputs)]) for i in range(args.requests)]
                arms = ["mixed", "switch", "peft"]
                arms = arms[round_index % 3 :] + arms[: round_index % 3]
                answers = {}
                for arm in arms:
                    if arm == "peft":
                        server = ReferenceServer(
                            reference, base.tokenizer, classify, args.max_batch, args.max_tokens
                        )
                        send = server.send
                    else:
                        engine = Engine(
                            base,
                            pool,
                            max_batch=args.max_batch,
                            max_queue=10_000,
                            timeout=600,
                            mixed=arm == "mixed",
                            log=lambda line: None,
                        )
                        engine.start()
                        send = engine_sender(engine, pool, base, classify, args.max_tokens)
                    if round_index == 0:  # untimed warm-up: first calls pay one-time costs
                        asyncio.run(closed_loop(send, jobs[: args.concurrency], args.concurrency))
                    seconds, latencies, answers[arm] = asyncio.run(closed_loop(send, jobs, args.concurrency))
                    (server.close() if arm == "peft" else engine.stop())
                    samples.setdefault((count, arm), []).append((seconds, latencies))
                    print(
                        f"{kind} adapters={count:2d} {arm:6s} round {round_index}: {len(jobs) / seconds:6.2f} req/s",
                        flush=True,
                    )
                agree[count] = sum(a == b for a, b in zip(answers["mixed"], answers["peft"])) / len(jobs)
        for (count, arm), runs in samples.items():
            seconds = statistics.median(s for s, _ in runs)
            latencies = sorted(lat for _, lats in runs for lat in lats)
            rows.append(
                {
                    "workload": kind,
                    "adapters": count,
                    "arm": arm,
                    "requests_per_s": round(args.requests / seconds, 3),
                    "p50_s": round(latencies[len(latencies) // 2], 4),
                    "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
                    "agree_with_peft": round(agree[count], 3) if arm == "mixed" else None,
                }
            )
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | adapters | arm | req/s | p50 s | p99 s | vs 1 adapter | mixed vs this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rate = {(r["workload"], r["adapters"], r["arm"]): r["requests_per_s"] for r in rows}
    for r in sorted(rows, key=lambda r: (r["workload"], r["adapters"], r["arm"])):
        one = rate.get((r["workload"], 1, r["arm"]))
        mixed = rate[(r["workload"], r["adapters"], "mixed")]
        lines.append(
            f"| {r['workload']} | {r['adapters']} | {r['arm']} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | "
            f"{r['p99_s']:.3f} | {r['requests_per_s'] / one:.2f}x | {mixed / r['requests_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="generate,classify")
    parser.add_argument("--adapters", default="1,4,16")
    parser.add_argument(
        "--requests", type=int, default=32, help="requests per arm and round (classification: x8)"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.adapters = [int(n) for n in args.adapters.split(",")]
    torch.set_num_threads(args.threads)
    rows = []
    requests = args.requests
    for kind in args.workloads.split(","):
        args.requests = requests * (8 if kind == "classify" else 1)
        rows += workload(kind, args)
    args.requests = requests
    print(report(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(
            json.dumps({"settings": settings, "torch": torch.__version__, "rows": rows}, indent=2) + "\n"
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
