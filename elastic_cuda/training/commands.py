"""`python -m elastic_cuda train-router` and `python -m elastic_cuda eval` (register(subparsers) adds both).

Defaults are sized for SmolLM2-135M-Instruct on one H200 (bf16): 120 optimizer steps x 16 samples (2 per task)
with lengths drawn from {1K, 2K, 4K, 8K} (mean ~3.8K tokens) = 1,920 samples, ~7.3M tokens, each forward+backward
running full AND streaming attention in all 30 layers. Budget estimate: ~0.1-0.15 s per sample -> ~2 s per step,
~4-5 minutes in all (the bar shows s/it after a few steps; the log has step_time_s; if a step takes T s, use
--steps ~270/T to stay in budget, since the LR/tau schedules are laid out over --steps).
Multi-GPU: `torchrun --nproc-per-node N -m elastic_cuda train-router ...` (the global batch is split over ranks).
Streaming defaults sink 64 / window 512: at 2K-8K prompts a streaming head then sees < 30% of the context and
loses the middle (where the sensitive tasks plant their facts), so the router has a real choice to learn; the
paper's 128 / 2048 would cover most of a 2K prompt and make every head look harmless at these lengths.
"""
from __future__ import annotations

import argparse

from ..attention.sparse_config import DEFAULT as SPARSE_DEFAULT
from ..attention.sparse_config import SPARSE_MODES


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths must be integers like 1024,2048, got {text!r}") from None
    if not values or min(values) < 128:
        raise argparse.ArgumentTypeError(f"--lengths must be >= 128 tokens each, got {text!r}")
    return values


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny-llama"),
                   help="backbone (tiny-llama: random 2-layer test model with a byte tokenizer)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _train(args):
    from .trainer import TrainConfig, train

    cfg = TrainConfig(out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size,
                      lengths=args.lengths, t_sen=args.t_sen, sink=args.sink, window=args.window,
                      sparse_mode=args.sparse_mode, block_size=args.block_size, xattn_threshold=args.xattn_threshold,
                      loss_on=args.loss_on, device=args.device, dtype=args.dtype, seed=args.seed,
                      save_every=args.save_every, resume=args.resume, init_routers=args.init_routers,
                      fresh_lambdas=args.fresh_lambdas, full_branch=args.full_branch,
                      num_workers=args.num_workers, micro_batch=args.micro_batch,
                      tau_schedule=args.tau_schedule, router_lr=args.router_lr, lambda_lr=args.lambda_lr,
                      standardize_input=not args.paper_router, head_bias=not args.paper_router,
                      calibration_samples=args.calibration_samples, progress=not args.no_progress)
    train(cfg)
    return 0


def _eval(args):
    from .evaluate import EvalConfig, evaluate, rewrite_report

    if args.report_from:
        print(rewrite_report(args.report_from))
        return 0

    cfg = EvalConfig(out=args.out, model=args.model, routers=args.routers, lengths=args.lengths,
                     samples_per_task=args.samples_per_task, max_new_tokens=args.max_new_tokens,
                     policies=tuple(args.policies.split(",")), sink=args.sink, window=args.window, seed=args.seed,
                     sparse_mode=args.sparse_mode,
                     device=args.device, dtype=args.dtype, calibration_per_task=args.calibration_per_task,
                     sparsity_shift=args.sparsity_shift, progress=not args.no_progress)
    evaluate(cfg)
    return 0


def register(subparsers) -> None:
    """Add the `train-router` and `eval` subcommands to an argparse subparsers object."""
    t = subparsers.add_parser("train-router", help="train attention routers (frozen backbone)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--out", default="runs/router", help="output dir (logs, checkpoints, routers/)")
    t.add_argument("--steps", type=int, default=120, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=16, help="samples per optimizer step, over all ranks")
    t.add_argument("--lengths", type=_lengths, default=(1024, 2048, 4096, 8192), help="prompt lengths in tokens")
    t.add_argument("--t-sen", type=float, default=0.7, help="target MSR of sparsity-sensitive tasks")
    t.add_argument("--sink", type=int, default=SPARSE_DEFAULT.sink)
    t.add_argument("--window", type=int, default=SPARSE_DEFAULT.window)
    t.add_argument("--sparse-mode", default=SPARSE_DEFAULT.sparse_mode, choices=tuple(SPARSE_MODES),
                   help="what a sparse head runs: STREAM (sink + window) or BLOCK (XAttention block masks estimated "
                        "at prefill)")
    t.add_argument("--block-size", type=int, default=SPARSE_DEFAULT.block_size, help="BLOCK mode: block size")
    t.add_argument("--xattn-threshold", type=float, default=SPARSE_DEFAULT.xattn_threshold,
                   help="BLOCK mode: attention mass each query block keeps (the paper's training value)")
    t.add_argument("--loss-on", default="answer", choices=("answer", "all"),
                   help="LM loss on answer tokens (default) or all tokens (the paper)")
    t.add_argument("--tau-schedule", default="code", choices=("code", "paper"))
    t.add_argument("--router-lr", type=float, default=5e-4, help="peak router LR (AdamW 0.9/0.95, wd 0.1)")
    t.add_argument("--lambda-lr", type=float, default=1e-3, help="peak LR of the lambdas (gradient ascent)")
    t.add_argument("--paper-router", action="store_true",
                   help="the paper's router exactly: no input standardisation, no per-head logit bias")
    t.add_argument("--calibration-samples", type=int, default=64,
                   help="train prompts measured for the router input standardisation before step 1")
    t.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    t.add_argument("--resume", default=None, help="checkpoint dir, or 'auto' for the latest under --out")
    t.add_argument("--init-routers", default=None,
                   help="fine-tune from a RouterSet dir (e.g. the shipped routers): its weights, input "
                        "standardisation and final lambdas (if saved), fresh optimizer; settings must match")
    t.add_argument("--fresh-lambdas", action="store_true",
                   help="with --init-routers: start the lambdas fresh instead of from the saved ones")
    t.add_argument("--micro-batch", type=int, default=1,
                   help="samples per forward on a rank (prompts left-padded, answers right-padded; same result as 1 "
                        "up to float rounding and the Gumbel noise draw, fewer kernel launches per sample)")
    t.add_argument("--full-branch", default="auto", choices=("auto", "op", "sdpa"),
                   help="how the training mix computes every head's FULL output: auto = torch SDPA (cuDNN / "
                        "FlashAttention) for unpadded CUDA fp16/bf16 prefills (1.58x per layer at 8K on an H200), "
                        "the elastic op otherwise")
    t.add_argument("--num-workers", type=int, default=4, help="data-building worker processes per rank")
    _common(t)
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="evaluate dense / elastic / static / all-sparse on the task suite")
    e.add_argument("--out", default="runs/router/eval")
    e.add_argument("--routers", default=None, help="RouterSet directory (from train-router: <out>/routers)")
    e.add_argument("--lengths", type=_lengths, default=(2048, 4096, 8192))
    e.add_argument("--samples-per-task", type=int, default=8, help="per task and length")
    e.add_argument("--calibration-per-task", type=int, default=2,
                   help="train-split prompts per task and length used to rank heads for the static policy")
    e.add_argument("--sparsity-shift", type=float, default=0.0,
                   help="elastic policy's inference budget knob (> 0 more heads sparse); static follows its MSR")
    e.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens (stops at end of turn)")
    e.add_argument("--policies", default="dense,elastic,static,all_sparse")
    e.add_argument("--report-from", default=None, metavar="EVAL_RESULTS_JSON",
                   help="no model run: re-aggregate this eval_results.json and rewrite its targets, report and plot")
    e.add_argument("--sink", type=int, default=None, help="default: the routers' config")
    e.add_argument("--window", type=int, default=None, help="default: the routers' config")
    e.add_argument("--sparse-mode", default=None, choices=tuple(SPARSE_MODES),
                   help="sparse mode of the router-free policies (e.g. all_sparse); default: the routers'")
    _common(e)
    e.set_defaults(func=_eval)


def main(argv=None) -> int:
    """Standalone entry (`python -m elastic_cuda.training.commands ...`) until the lead wires the CLI."""
    parser = argparse.ArgumentParser(prog="elastic_cuda")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
