"""Command line: ``peftkit demo [options]``. Thin by design: it parses and calls the library."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="LoRA-tune MiniLM on Rotten Tomatoes sentiment, save the adapter, reload and check it",
        description="Fine-tune the bundled MiniLM with LoRA on Rotten Tomatoes review sentiment (a few "
        "minutes on 2 CPU cores); print accuracy before/after, trainable parameters, training time and "
        "adapter size; then reload the adapter into a fresh base model and check its predictions.",
    )
    demo.add_argument("--output-dir", default="runs/demo-adapter", help="where to save the adapter (default: %(default)s)")
    demo.add_argument("--steps", type=_positive, default=200, help="optimizer steps (default: %(default)s)")
    demo.add_argument("--batch-size", type=_positive, default=32, help="reviews per step (default: %(default)s)")
    demo.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    demo.add_argument("--rank", type=_positive, default=8, help="LoRA rank r (default: %(default)s)")
    demo.add_argument(
        "--targets", default="query,value",
        help="comma-separated module names to adapt, or all-linear (default: %(default)s)",
    )
    demo.add_argument("--max-length", type=_positive, default=64, help="tokens per review (default: %(default)s)")
    demo.add_argument("--eval-split", choices=["test", "validation"], default="test", help="split to report (default: %(default)s)")
    demo.add_argument("--eval-examples", type=_positive, default=None, help="evaluate on the first N reviews only (default: all)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the head init and data order (default: %(default)s)")
    demo.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all available cores)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("peftkit: error: a command is required (try `peftkit demo`)", file=sys.stderr)
        return 2

    from .demo import run_demo  # imported late: `peftkit --help` should not load transformers

    targets = "all-linear" if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    try:
        result = run_demo(
            args.output_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr, r=args.rank,
            target_modules=targets, max_length=args.max_length, eval_split=args.eval_split,
            eval_examples=args.eval_examples, seed=args.seed, threads=args.threads,
        )
    except (ImportError, OSError) as exc:  # missing data/model package, unwritable output directory
        print(f"peftkit demo: error: {exc}", file=sys.stderr)
        return 1
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
