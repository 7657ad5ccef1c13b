"""The ``peftkit`` command line. Thin by design: parse, call a library function, print.

``train`` / ``eval`` / ``predict`` / ``merge`` call :mod:`peftkit.run.runner`, ``combine`` and ``convert``
:mod:`peftkit.run.combine`, ``export --check vllm`` :mod:`peftkit.serve.vllm`, ``inspect`` calls
:mod:`peftkit.run.inspect`, ``compare`` and ``demo`` call :mod:`peftkit.compare`, ``report`` calls
:mod:`peftkit.report`. Exit codes: 0 ok, 1 failure (a file
missing at run time, training diverged, a model that cannot be loaded ...), 2 usage or config error
(every problem in the config is printed). The library is imported inside each command, so that
``peftkit --help`` loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's convention for a process stopped by Ctrl-C

EPILOG = """\
exit codes: 0 ok, 1 failure (missing file at run time, training diverged ...), 2 usage or config error.
Set PEFTKIT_DEBUG=1 to see the traceback of a failure.

examples:
  peftkit train configs/sentiment-minilm-lora.yaml train.steps=200 adapter.r=16
  peftkit train configs/sentiment-minilm-lora.yaml --resume
  peftkit eval runs/sentiment-minilm-lora --split validation
  echo "a gripping, funny film" | peftkit predict runs/sentiment-minilm-lora
  peftkit predict runs/instruct-smollm2-lora --stream --max-new-tokens 64 <<< "Name three colours."
  peftkit chat runs/instruct-smollm2-lora --temperature 0.7
  peftkit merge runs/sentiment-minilm-lora exports/sentiment-minilm
  peftkit combine runs/a runs/b --weights 1 1 --method ties --density 0.5 --out exports/a-plus-b
  peftkit convert runs/sentiment-minilm-loha --to lora --energy 0.99 --out exports/as-lora
  peftkit export --check vllm runs/instruct-smollm2-lora
  peftkit inspect minilm
  peftkit select configs/sentiment-minilm-lora.yaml --budget 0.4%
  peftkit compare configs/compare-sentiment-minilm.yaml --seeds 1 train.steps=40
See docs/cli.md and docs/config.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning of PyTorch models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_eval(commands)
    _add_predict(commands)
    _add_chat(commands)
    _add_merge(commands)
    _add_combine(commands)
    _add_convert(commands)
    _add_export(commands)
    _add_inspect(commands)
    _add_select(commands)
    _add_compare(commands)
    _add_report(commands)
    _add_serve(commands)
    _add_demo(commands)
    return parser


def _command(
    commands: Any, name: str, summary: str, description: str, handler: Callable[..., int]
) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 100),
        epilog=EPILOG.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(handler=handler)
    return sub


def _add_train(commands: Any) -> None:
    sub = _command(
        commands,
        "train",
        "fine-tune a model from a YAML run config",
        "Train the adapter (or every parameter, with adapter.method: full) described by CONFIG, pick the best "
        "checkpoint on the validation split, evaluate it on the test split, and save config.yaml, metrics.json "
        "and the adapter in output_dir. Stop it at any time (Ctrl-C) and continue with --resume. "
        "--nproc N trains data-parallel in N processes through torchrun (see docs/distributed.md).",
        _train,
    )
    # --nproc may stand anywhere; listed last so that the usage line starts as it did before
    sub.usage = "%(prog)s [-h] [--resume] CONFIG.yaml [KEY=VALUE ...] [--nproc N]"
    sub.add_argument("config", metavar="CONFIG.yaml", help="the run config (see docs/config.md, configs/)")
    sub.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied on top of the file, e.g. train.lr=1e-3 adapter.r=16 "
        "data.columns.text=review (values are read as YAML)",
    )
    sub.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its latest checkpoint (bit-identical to an "
        "uninterrupted run)",
    )
    sub.add_argument(
        "--nproc",
        type=_positive,
        default=None,
        metavar="N",
        help="train data-parallel in N processes on this machine (one per GPU; on CPU, gloo): "
        "runs `python -m torch.distributed.run --standalone --nproc-per-node N -m peftkit train "
        "...`; train.batch_size is per process. Several machines: launch torchrun yourself",
    )


def _add_eval(commands: Any) -> None:
    sub = _command(
        commands,
        "eval",
        "evaluate a trained run (or a config's untrained base model)",
        "Evaluate the trained weights of RUN_DIR on one split and print the metrics as JSON (also written to "
        "RUN_DIR/eval-SPLIT.json). Given a CONFIG.yaml instead, evaluate its base model without any "
        "training: the number fine-tuning should beat.",
        _eval,
    )
    sub.add_argument("source", metavar="RUN_DIR|CONFIG.yaml", help="a run's output_dir, or a run config")
    sub.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides (with CONFIG.yaml only)"
    )
    sub.add_argument(
        "--split",
        choices=["train", "validation", "test"],
        default=None,
        help="the split to evaluate (default: the config's eval.split)",
    )
    sub.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="examples per forward pass (default: eval.batch_size)",
    )


def _add_predict(commands: Any) -> None:
    sub = _command(
        commands,
        "predict",
        "predict with a trained run, inputs from a file or stdin",
        'Read inputs, one per line (plain text, or a JSON value such as {"text": ...} per line: JSONL), '
        "from FILE or standard input, and print one prediction per line as JSON, in input order.",
        _predict,
    )
    sub.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    sub.add_argument(
        "input", metavar="FILE|-", nargs="?", default="-", help="input file; - or nothing reads stdin"
    )
    sub.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="inputs per forward pass (default: eval.batch_size)",
    )
    sub.add_argument(
        "--input-key",
        default=None,
        metavar="KEY",
        help="the key of JSON inputs that holds the input (default: the task's: text, prompt, image, source)",
    )
    _add_generation_options(sub)
    sub.add_argument(
        "--stream",
        action="store_true",
        help="generation tasks, one input: print the answer as it is generated (then its JSON line)",
    )


def _add_chat(commands: Any) -> None:
    sub = _command(
        commands,
        "chat",
        "talk to a trained causal-LM run, turn by turn",
        "An interactive, multi-turn conversation with a causal-lm run in its chat template: each line you type "
        "is a user turn, the answer streams as it is generated. /reset starts over, /exit or Ctrl-D ends. "
        "Lines may also come from a pipe.",
        _chat,
    )
    sub.add_argument("run_dir", metavar="RUN_DIR", help="a causal-lm run's output_dir")
    sub.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="a system prompt for this session (default: data.system_prompt)",
    )
    _add_generation_options(sub)
    sub.add_argument("--no-stream", action="store_true", help="print each answer when it is finished")


# command-line option -> (generation field, type); the defaults live in the run's generation section
GENERATION_OPTIONS = {
    "--max-new-tokens": ("max_new_tokens", int),
    "--temperature": ("temperature", float),
    "--top-p": ("top_p", float),
    "--top-k": ("top_k", int),
    "--num-beams": ("num_beams", int),
    "--repetition-penalty": ("repetition_penalty", float),
    "--seed": ("seed", int),
}


def _add_generation_options(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group(
        "generation (causal-lm and seq2seq runs; default: the run's generation section)"
    )
    for option, (name, kind) in GENERATION_OPTIONS.items():
        group.add_argument(option, dest=f"gen_{name}", type=kind, default=None, metavar=kind.__name__.upper())
    group.add_argument(
        "--sample",
        dest="gen_do_sample",
        action="store_const",
        const=True,
        default=None,
        help="sample (with the temperature / top-p / top-k given) instead of greedy decoding",
    )


def _generation_changes(args: argparse.Namespace) -> dict[str, Any]:
    names = [name for name, _ in GENERATION_OPTIONS.values()] + ["do_sample"]
    return {name: getattr(args, f"gen_{name}") for name in names if getattr(args, f"gen_{name}") is not None}


def _add_merge(commands: Any) -> None:
    sub = _command(
        commands,
        "merge",
        "export a merged model directory that plain transformers loads",
        "Fold the run's adapter into the base weights and save the result, with its tokenizer, to OUT_DIR: "
        "a model directory that transformers' from_pretrained loads without peftkit. Methods that change "
        "inputs or attention instead of weights (soft prompts, bottleneck adapters) cannot be merged.",
        _merge,
    )
    sub.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    sub.add_argument(
        "out_dir", metavar="OUT_DIR", help="where the merged model goes (must not exist, or be empty)"
    )


def _add_combine(commands: Any) -> None:
    sub = _command(
        commands,
        "combine",
        "combine saved adapters into one plain LoRA (weighted sum, SVD, TIES, DARE ...)",
        "Load the adapters (run directories or adapter directories, all of one base model) onto their base, "
        "combine their weight deltas with the weights and method given, and save one plain LoRA adapter to OUT, "
        "in the format the reference library (PEFT) loads, with combine_report.json (each module's rank and "
        "approximation error). linear and cat are exact; the other methods end in a truncated SVD. See "
        "docs/combine.md.",
        _combine,
    )
    sub.add_argument(
        "sources", nargs="+", metavar="ADAPTER_DIR", help="run directories or adapter directories"
    )
    sub.add_argument(
        "--weights",
        nargs="+",
        required=True,
        metavar="W",
        help="one weight per adapter, e.g. --weights 1 0.5 or --weights=1,-1 (negative: subtract)",
    )
    sub.add_argument(
        "--method",
        default="linear",
        choices=["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"],
        help="how the deltas are combined (default: linear, the exact weighted sum)",
    )
    _add_truncation(sub)
    sub.add_argument(
        "--density", type=float, default=None, help="share of entries kept (ties, dare_*, magnitude_prune)"
    )
    sub.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    sub.add_argument("--sign", default="total", choices=["total", "frequency"], help="TIES's sign election")
    sub.add_argument(
        "--out", required=True, metavar="DIR", help="where the adapter goes (must not exist, or be empty)"
    )
    sub.add_argument(
        "--base", default=None, metavar="MODEL", help="the base model (default: the adapters' own)"
    )
    sub.add_argument("--name", default="combined", help=argparse.SUPPRESS)


def _add_convert(commands: Any) -> None:
    sub = _command(
        commands,
        "convert",
        "write any additive adapter, or a full fine-tune's difference, as a plain LoRA",
        "Write SOURCE as a plain LoRA adapter in OUT, for engines and tools that only read LoRA: an adapter "
        "(LoHa, LoKr, VeRA, AdaLoRA, IA3, OFT, DoRA, a linear bottleneck) by a truncated SVD of each layer's "
        "delta; a full fine-tuning run or a fine-tuned model directory (with --base) by a truncated SVD of each "
        "layer's weight difference. Prints each module's realised rank and relative error, also written to "
        "OUT/combine_report.json. See docs/combine.md.",
        _convert,
    )
    sub.add_argument(
        "source",
        metavar="SOURCE",
        help="a run directory, an adapter directory, or a fine-tuned model directory (config.json)",
    )
    sub.add_argument("--to", required=True, choices=["lora"], help="the format to write (lora)")
    _add_truncation(sub)
    sub.add_argument(
        "--out", required=True, metavar="DIR", help="where the adapter goes (must not exist, or be empty)"
    )
    sub.add_argument(
        "--base", default=None, metavar="MODEL", help="the base model (default: the source's own)"
    )
    sub.add_argument(
        "--targets",
        default=None,
        metavar="NAMES",
        help="extraction only: comma-separated module names or suffixes to hold (default: every layer a LoRA "
        "can adapt but embeddings and heads)",
    )


def _add_export(commands: Any) -> None:
    sub = _command(
        commands,
        "export",
        "check that a serving engine would accept a saved adapter (--check vllm)",
        "With --check vllm: read the adapter in ADAPTER_DIR (an adapter directory, or a run directory's adapter) "
        "and report whether vLLM would serve it: LoRA only, no DoRA, bias none, no modules_to_save, a rank vLLM's "
        "--max-lora-rank allows, modules vLLM adapts. Each problem is printed with its fix; when it passes, the "
        "`vllm serve` command line that serves it. Exit 0 when vLLM would accept it, 1 when not. See docs/vllm.md; "
        "for a merged model directory, use `peftkit merge`.",
        _export,
    )
    sub.add_argument(
        "adapter_dir", nargs="?", metavar="ADAPTER_DIR", help="an adapter directory or a run's output_dir"
    )
    sub.add_argument(
        "--check",
        choices=["vllm"],
        default=None,
        help="the engine whose rules the adapter is checked against",
    )
    sub.add_argument(
        "--name", default=None, help="the name to serve it under (default: the directory's name)"
    )
    sub.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_truncation(sub: argparse.ArgumentParser) -> None:
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--rank", type=_positive, default=None, help="the rank of every module")
    group.add_argument(
        "--energy",
        type=float,
        default=None,
        metavar="E",
        help="per module, the smallest rank keeping this share of the squared singular values, e.g. 0.99",
    )


def _add_inspect(commands: Any) -> None:
    sub = _command(
        commands,
        "inspect",
        "list a model's adaptable modules, target sets and each method's defaults",
        "Show the modules of MODEL that a PEFT method can adapt, grouped by kind and layer; the modules and "
        "parameters each candidate target_modules value selects, and what a rank-8 LoRA on them adds; and "
        "the targets each registered method picks by default. Transformers models are inspected from their "
        "config alone (no weights are loaded).",
        _inspect,
    )
    sub.add_argument(
        "model",
        metavar="MODEL",
        help="a bundled model (minilm, smollm2-135m-instruct, efficientnet-lite0), a local model "
        "directory, a hub id, or a run config CONFIG.yaml",
    )
    sub.add_argument(
        "--task",
        default=None,
        help="load MODEL the way this task does (needed for non-transformers "
        "models such as efficientnet-lite0: --task image-classification)",
    )
    sub.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_select(commands: Any) -> None:
    sub = _command(
        commands,
        "select",
        "choose which modules to adapt, and at what rank, under a parameter budget",
        "Probe the frozen model of CONFIG on a few training batches (select.probe_batches forward and backward "
        "passes), score every module LoRA can adapt (and, with select.whole_params=true, normalisation layers, "
        "biases and small heads), and spend the budget where a parameter buys the most: the LoRA targets and a "
        "rank per module. Writes OUT/selected.yaml, a ready-to-train config, with "
        "selection.md and selection.png explaining the choice. `adapter.target_modules: auto` in any training "
        "config does the same before training (see docs/select.md).",
        _select,
    )
    sub.add_argument("config", metavar="CONFIG.yaml", help="a run config with adapter.method: lora")
    sub.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. select.score=fisher"
    )
    sub.add_argument(
        "--budget",
        default=None,
        metavar="B",
        help="trainable parameters to spend: a share of the model such as 0.5%% or a count such as "
        "82944 or 83k (default: the config's select.budget)",
    )
    sub.add_argument(
        "--score",
        default=None,
        choices=["gradient", "adam", "fisher", "activation", "random"],
        help="how candidates are scored (default: the config's select.score, gradient)",
    )
    sub.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where selected.yaml and the explanation go (default: OUTPUT_DIR-selection)",
    )


def _add_compare(commands: Any) -> None:
    sub = _command(
        commands,
        "compare",
        "train full fine-tuning and PEFT methods side by side and report the trade-offs",
        "Train every run of CONFIG's compare: section (full fine-tuning and PEFT methods) on the same task, "
        "data, split, step budget and seeds, each in its own process; record test quality, trainable "
        "parameters, artifact size, peak memory, time, time to target, latency and forgetting as one JSON "
        "record per run; then write report.md and report.html. Running it again skips finished runs.",
        _compare,
    )
    sub.add_argument(
        "config",
        metavar="CONFIG.yaml",
        help="a comparison config (see docs/compare.md, configs/compare-*.yaml)",
    )
    _add_compare_options(sub)


def _add_compare_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the shared sections (every run), e.g. train.steps=50, or of "
        "compare settings, e.g. compare.target_fraction=0.9",
    )
    sub.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="seeds to run: a count (3 = 0,1,2) or a comma-separated list (default: compare.seeds)",
    )
    sub.add_argument("--only", default=None, help="comma-separated run names: run and report only these")
    sub.add_argument(
        "--output-dir", default=None, help="the comparison's directory (default: the config's output_dir)"
    )


def _add_report(commands: Any) -> None:
    sub = _command(
        commands,
        "report",
        "rewrite a comparison's report from its run records",
        "Read DIR/records/*.json (written by peftkit compare) and write DIR/report.md, DIR/report.html and "
        "DIR/figures/ again; print the summary table.",
        _report,
    )
    sub.add_argument("directory", metavar="DIR", help="a comparison's output_dir")


def _add_demo(commands: Any) -> None:
    demo = _command(
        commands,
        "demo",
        "the default comparison: MiniLM on Rotten Tomatoes, full fine-tuning vs six PEFT runs",
        "Run the default comparison (about 22 minutes on 2 CPU cores): the bundled MiniLM learns Rotten "
        "Tomatoes review sentiment by full fine-tuning, LoRA, IA3, prompt tuning, BitFit, a bottleneck "
        "adapter and LoRA with selected targets, each at the learning rate its search on the validation "
        "split chose, 3 seeds each; print the summary table and say where the report is. Stop it at any time; "
        "running it again continues where it stopped. --print-config shows the comparison config.",
        _demo,
    )
    _add_compare_options(demo)
    demo.add_argument(
        "--print-config", action="store_true", help="print the demo's comparison config and exit"
    )


def _seed_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or comma-separated integers, got {text!r}"
        ) from None
    if len(values) == 1 and "," not in text:
        if values[0] <= 0:
            raise argparse.ArgumentTypeError(f"a seed count must be positive, got {values[0]}")
        return list(range(values[0]))
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# -- commands --------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from .run import runner
    from .run.config import load_config
    from .train.distributed import launch, launched_world_size, process_group

    config = load_config(args.config, args.overrides)  # a bad config fails here, once, before any launch
    world_size = launched_world_size()
    if args.nproc is not None and world_size > 1 and args.nproc != world_size:
        return _usage(
            "train",
            f"--nproc {args.nproc} but torchrun started {world_size} processes: drop --nproc under torchrun",
        )
    if args.nproc is not None and args.nproc > 1 and world_size == 1:
        # this command again, in N processes started by torchrun
        again = ["-m", "peftkit", "train", args.config, *args.overrides]
        return launch(args.nproc, again + (["--resume"] if args.resume else []))
    # under torchrun every rank trains, and this command owns the process group until it returns
    with process_group(config.train.device) as world:
        result = runner.train_run(config, resume=args.resume, log=print)
    if not world.is_main:
        return EXIT_OK  # rank 0 reports
    metrics = result.metrics
    if result.status == "interrupted":
        print(
            f"peftkit train: interrupted; checkpoint saved, continue with `peftkit train {args.config} "
            f"{' '.join(args.overrides)}{' ' if args.overrides else ''}--resume`",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not result.ok:
        print(
            f"peftkit train: error: training {result.status}: {metrics.get('stop_reason')}", file=sys.stderr
        )
        return EXIT_FAILURE
    test = metrics.get("test") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
    print(f"done: {result.run_dir}" + (f" | test {shown}" if shown else " | no test split"))
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    from .run.runner import eval_run

    source = Path(args.source)
    if not source.exists():
        return _usage(
            "eval",
            f"{args.source!r} does not exist (relative paths start from {str(Path.cwd())!r}); give "
            "a run directory (the output_dir of `peftkit train`) to evaluate its trained weights, or a "
            "run config YAML to evaluate its untrained base model",
        )
    if source.is_dir():
        if args.overrides:
            return _usage(
                "eval", f"overrides {args.overrides} apply to a CONFIG.yaml, not to a run directory"
            )
        metrics = eval_run(source, args.split, batch_size=args.batch_size)
    else:
        from .run.config import load_config

        metrics = eval_run(load_config(source, args.overrides), args.split, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2, default=str))
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from .run.runner import predict_run

    if args.input == "-":
        inputs = parse_inputs(sys.stdin)
    else:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(
                f"input file {str(path)!r} does not exist; give a file of inputs, one per line, or - for stdin"
            )
        with path.open(encoding="utf-8") as handle:
            inputs = parse_inputs(handle)
    predictions = predict_run(
        args.run_dir,
        inputs,
        args.batch_size,
        args.input_key,
        generation=_generation_changes(args),
        stream=args.stream,
    )
    for prediction in predictions:
        print(json.dumps(prediction, ensure_ascii=False, default=str))
    return EXIT_OK


def _chat(args: argparse.Namespace) -> int:
    from .run.chat import chat_session

    interactive = sys.stdin.isatty()
    stream = not args.no_stream and sys.stdout.isatty()
    if interactive:
        print(
            f"peftkit chat with {args.run_dir}: type a message; /reset starts over, /exit or Ctrl-D ends.",
            file=sys.stderr,
        )

    def read(prompt: str) -> str:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    def write(text: str) -> None:
        print(text, flush=True)

    chat_session(
        args.run_dir,
        read=read,
        write=write,
        generation=_generation_changes(args),
        system_prompt=args.system,
        stream=stream,
    )
    return EXIT_OK


def parse_inputs(lines: Iterable[str]) -> list[Any]:
    """One input per non-empty line: a JSON object, array or string as its value, anything else as text."""
    inputs: list[Any] = []
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.lstrip()[:1] in ("{", "[", '"'):
            try:
                inputs.append(json.loads(text))
                continue
            except json.JSONDecodeError:
                pass  # text that merely starts with a bracket or quote
        inputs.append(text)
    return inputs


def _merge(args: argparse.Namespace) -> int:
    from .run.runner import merge_run, merged_loader

    out = merge_run(args.run_dir, args.out_dir)
    print(f"merged model saved to {out}; load it with {merged_loader(out)}")
    return EXIT_OK


def _combine(args: argparse.Namespace) -> int:
    from .run.combine import combine_dirs

    try:
        weights = [float(w) for token in args.weights for w in token.split(",") if w.strip()]
    except ValueError:
        return _usage("combine", f"--weights takes numbers, got {' '.join(args.weights)!r}")
    missing = _missing_source("combine", args.sources)
    if missing is not None:
        return missing
    report = combine_dirs(
        args.sources,
        weights,
        args.out,
        base=args.base,
        name=args.name,
        method=args.method,
        rank=args.rank,
        energy=args.energy,
        density=args.density,
        seed=args.seed,
        sign=args.sign,
    )
    print(report)
    print(
        f"saved {args.out} (a plain LoRA; load it with peftkit.load_adapter or peft.PeftModel.from_pretrained)"
    )
    return EXIT_OK


def _missing_source(command: str, sources: list[str]) -> int | None:
    """A usage error (exit 2) for the first source directory that does not exist, before anything loads."""
    for source in sources:
        if not Path(source).exists():
            return _usage(
                command,
                f"{source!r} does not exist (relative paths start from {str(Path.cwd())!r}); give the "
                "output_dir of `peftkit train`, or a directory written by save_adapter / save_pretrained",
            )
    return None


def _convert(args: argparse.Namespace) -> int:
    from .run.combine import convert_dir

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    missing = _missing_source("convert", [args.source])
    if missing is not None:
        return missing
    report = convert_dir(
        args.source, args.out, base=args.base, rank=args.rank, energy=args.energy, target_modules=targets
    )
    print(report)
    print(
        f"saved {args.out} (a plain LoRA; load it with peftkit.load_adapter or peft.PeftModel.from_pretrained)"
    )
    return EXIT_OK


def _add_serve(commands: Any) -> None:
    sub = _command(
        commands,
        "serve",
        "serve a base model and many adapters over an OpenAI-compatible HTTP API",
        "Serve BASE (a run directory, a model directory or a bundled model name) with adapters chosen per "
        "request by the `model` field: /v1/models, /v1/completions, /v1/chat/completions (streaming too), "
        "/v1/classify for text-classification runs, and vLLM's /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter. Requests for different adapters are batched together. Stop it with "
        "Ctrl-C: requests in flight finish first. See docs/serving.md and docs/security.md.",
        _serve,
    )
    sub.add_argument(
        "base", metavar="BASE", help="a run directory, a model directory or a bundled model name"
    )
    sub.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as NAME (a run directory or an adapter directory); repeatable. A run "
        "given as BASE serves its own adapter under the run directory's name",
    )
    sub.add_argument(
        "--adapters-dir",
        metavar="DIR",
        help="a directory of adapters: a request for NAME loads DIR/NAME on first use; clients may also "
        "load from it at runtime",
    )
    sub.add_argument(
        "--allow-load-from",
        action="append",
        default=[],
        metavar="DIR",
        help="another directory /v1/load_lora_adapter may load from (runtime loading is off without "
        "--adapters-dir or this)",
    )
    sub.add_argument(
        "--max-adapters",
        type=int,
        default=8,
        metavar="N",
        help="adapters resident at once (LRU beyond; default 8)",
    )
    sub.add_argument(
        "--task",
        choices=["causal-lm", "text-classification"],
        help="BASE's task when it is not a run (default causal-lm)",
    )
    sub.add_argument("--name", help="the model id of the base in the API (default: the model's name)")
    sub.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:1 ...",
    )
    sub.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on every /v1 endpoint (or set $PEFTKIT_API_KEY, which "
        "keeps the key out of the process list)",
    )
    sub.add_argument(
        "--max-batch", type=int, default=16, metavar="N", help="most rows per forward pass (default 16)"
    )
    sub.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="most requests waiting or running; beyond: HTTP 429 (default 256)",
    )
    sub.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds a request may take; beyond: HTTP 504 (default 120)",
    )
    sub.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a classification request waits for others to batch with (default 5)",
    )
    sub.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="on shutdown, how long requests in flight may take to finish (default 30)",
    )


def _serve(args: argparse.Namespace) -> int:
    from .serve.server import ServerOptions, run_server

    options = ServerOptions(
        base=args.base,
        adapters=args.adapter,
        adapters_dir=args.adapters_dir,
        allow_load_from=args.allow_load_from,
        max_adapters=args.max_adapters,
        task=args.task,
        name=args.name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        batch_window_ms=args.batch_window_ms,
        drain_seconds=args.drain_seconds,
        device=args.device,
    )
    try:
        run_server(options, log=lambda line: print(line, flush=True))
    except FileNotFoundError as exc:
        return _usage("serve", str(exc))
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    if args.check is None:
        return _usage(
            "export",
            "say what to export for: `peftkit export --check vllm ADAPTER_DIR` checks whether vLLM would serve "
            "the adapter (and prints the `vllm serve` command); for a merged model directory that any engine "
            "loads, use `peftkit merge RUN_DIR OUT_DIR`",
        )
    if args.adapter_dir is None:
        return _usage("export", "give the adapter to check: `peftkit export --check vllm ADAPTER_DIR`")
    from .serve.vllm import check_vllm

    try:
        report = check_vllm(args.adapter_dir, name=args.name)
    except FileNotFoundError as exc:  # nothing to check: a wrong path, not a refused adapter
        return _usage("export", str(exc))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK if report.accepted else EXIT_FAILURE


def _inspect(args: argparse.Namespace) -> int:
    from .run.inspect import inspect_model

    config = None
    if Path(args.model).is_file() and Path(args.model).suffix in (".yaml", ".yml"):
        from .run.config import load_config

        config = load_config(args.model)
    report = inspect_model(args.model, task=args.task, config=config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK


def _select(args: argparse.Namespace) -> int:
    from .run.config import load_config
    from .run.runner import select_run

    overrides = list(args.overrides)
    overrides += [f"select.budget={args.budget}"] if args.budget is not None else []
    overrides += [f"select.score={args.score}"] if args.score is not None else []
    config = load_config(args.config, overrides)
    if config.select.budget is None:
        return _usage(
            "select",
            "no budget: give --budget (e.g. --budget 0.5% or --budget 82944) or set select.budget "
            "in the config",
        )
    select_run(config, args.out or f"{config.output_dir.rstrip('/')}-selection", log=print)
    return EXIT_OK


def _compare(args: argparse.Namespace, config_path: str | None = None) -> int:
    from .compare import load_compare_config, run_comparison

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_compare_config(config_path or args.config, overrides, seeds=args.seeds)
    if args.only:
        config = config.select(n.strip() for n in args.only.split(",") if n.strip())
    print(
        f"comparing {', '.join(config.names)} with seeds {config.seeds} ({len(config.runs)} runs) in {config.output_dir}"
    )
    result = run_comparison(config, log=print)
    if result.report:
        print("\n" + result.report["markdown"].read_text().split("\n", 2)[2].split("![")[0].rstrip())
        print(f"\nreport: {result.report['html']} (and {result.report['markdown'].name}, figures/, records/)")
    if result.failed:
        print(
            f"peftkit {args.command}: error: {len(result.failed)} run(s) failed: {', '.join(result.failed)}; their "
            f"logs are in {config.output_dir / 'logs'}; run the same command again to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .compare import read_record
    from .compare.config import parse_compare_config
    from .report import write_report

    directory = Path(args.directory)
    records = [r for r in (read_record(p) for p in sorted((directory / "records").glob("*.json"))) if r]
    if not records:
        raise FileNotFoundError(
            f"no run records in {directory / 'records'}: is {str(directory)!r} the output_dir of "
            "`peftkit compare`?"
        )
    config = None
    if (directory / "compare.yaml").is_file():  # keeps the run order and target settings of the comparison
        from .run.config import parse_yaml

        try:
            config = parse_compare_config(parse_yaml((directory / "compare.yaml").read_text()))
        except ValueError:
            config = None  # records alone are enough; order falls back to the records'
    from .compare.runner import report_extras

    paths = write_report(directory, records, config, **report_extras(directory))
    print(paths["markdown"].read_text().split("\n", 2)[2].split("![")[0].rstrip())
    print(f"\nreport: {paths['html']}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CONFIG

    if args.print_config:
        print(DEMO_CONFIG.read_text(), end="")
        return EXIT_OK
    return _compare(args, str(DEMO_CONFIG))


# -- entry point -----------------------------------------------------------------------------------


def _usage(command: str, message: str) -> int:
    print(f"peftkit {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage or config error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("peftkit: error: a command is required (see `peftkit --help`)", file=sys.stderr)
        return EXIT_USAGE
    from .errors import ConfigError

    try:
        return args.handler(args)
    except ConfigError as exc:
        return _usage(args.command, str(exc))
    except KeyboardInterrupt:
        hints = {
            "train": " (continue with `peftkit train CONFIG --resume`)",
            "compare": " (the finished runs are kept: run the same command again to continue)",
        }
        hint = hints.get("compare" if args.command == "demo" else args.command, "")
        print(f"\npeftkit {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message and exit code 1
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        expected = (OSError, ImportError, ValueError, RuntimeError, TypeError, KeyError)
        what = "" if isinstance(exc, expected) else f"{type(exc).__name__}: "
        hint = "" if isinstance(exc, expected) else " (PEFTKIT_DEBUG=1 shows the traceback)"
        print(f"peftkit {args.command}: error: {what}{exc}{hint}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
