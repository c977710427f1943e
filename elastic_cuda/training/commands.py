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
import os

from .. import cli_args
from ..attention import FULL_BRANCHES

TRAIN_DESCRIPTION = """Train attention routers for a frozen model (default SmolLM2-135M-Instruct): each layer's
router learns, per input and per KV head, whether the head needs full attention or can run sparse (STREAM: sink +
window; BLOCK: XAttention block masks), under per-task sparsity targets: a fraction --t-sen of the KV heads sparse
on sparsity-sensitive tasks (retrieval), all of them on robust tasks.

Writes <out>/routers (pass it to `demo --routers` or `eval --routers`), train_log.jsonl, training_curves.png and
checkpoints every --save-every steps (continue with --resume). The defaults take ~5 minutes on one H200. To try the
pipeline on a CPU: --model tiny-llama --steps 2 --batch-size 2 --lengths 512 (a random 2-layer model).
Several GPUs: torchrun --nproc-per-node N -m elastic_cuda train-router ... (the batch is split over the ranks)."""

EVAL_DESCRIPTION = """Evaluate routing policies on held-out prompts of the task suite (sparsity-sensitive
retrieval tasks scored by accuracy, robust tasks by answer loss) at each --lengths: dense (every head full),
elastic (the trained --routers), static (a fixed head split with the routers' average sparsity) and all_sparse.

Writes eval_results.json, eval_report.md and eval_summary.png under --out.
Several GPUs: torchrun --nproc-per-node N -m elastic_cuda eval ..."""

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


def _resume(text: str) -> str:
    """'auto' or a checkpoint directory (state.json + state.safetensors, see checkpoint.py)."""
    from .checkpoint import state_exists

    if text == "auto" or state_exists(os.path.join(text, "state")):
        return text
    if os.path.isfile(os.path.join(text, "state.pt")):
        raise argparse.ArgumentTypeError(f"{text}: state.pt is the old pickle checkpoint format, which resume no "
                                         "longer reads (unpickling can run code)")
    raise argparse.ArgumentTypeError(f"{text}: not a checkpoint directory (no state.json; e.g. "
                                     "<out>/checkpoints/step_000050, or 'auto' for the latest under --out)")


def _policies(text: str) -> tuple[str, ...]:
    from .evaluate import POLICIES

    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in values if x not in POLICIES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(POLICIES)}, got {text!r}")
    return values


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny-llama"),
                   help="backbone (tiny-llama: random 2-layer test model with a byte tokenizer)")
    p.add_argument("--device", type=cli_args.device_or_auto, default="auto",
                   help="auto (cuda if available) | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed (data; router initialisation in train-router)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


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
                     policies=args.policies, sink=args.sink, window=args.window, seed=args.seed,
                     sparse_mode=args.sparse_mode,
                     device=args.device, dtype=args.dtype, calibration_per_task=args.calibration_per_task,
                     sparsity_shift=args.sparsity_shift, progress=not args.no_progress)
    evaluate(cfg)
    return 0


def register(subparsers) -> None:
    """Add the `train-router` and `eval` subcommands to an argparse subparsers object."""
    t = subparsers.add_parser("train-router", help="train attention routers (frozen backbone)",
                              description=TRAIN_DESCRIPTION, formatter_class=cli_args.HelpFormatter)
    t.add_argument("--out", default="runs/router", help="output dir (logs, checkpoints, routers/)")
    t.add_argument("--steps", type=cli_args.positive_int, default=120,
                   help="optimizer steps (the LR and temperature schedules span them)")
    t.add_argument("--batch-size", type=cli_args.positive_int, default=16,
                   help="samples per optimizer step, over all ranks")
    t.add_argument("--lengths", type=_lengths, default=(1024, 2048, 4096, 8192),
                   help="prompt lengths in tokens, comma-separated, each >= 128 (default 1024,2048,4096,8192)")
    t.add_argument("--t-sen", type=cli_args.fraction, default=0.7,
                   help="target MSR (fraction of KV heads sparse) of the sparsity-sensitive tasks")
    t.add_argument("--sink", type=cli_args.nonnegative_int, default=SPARSE_DEFAULT.sink,
                   help="STREAM heads: sink tokens")
    t.add_argument("--window", type=cli_args.positive_int, default=SPARSE_DEFAULT.window,
                   help="STREAM heads: local window tokens")
    t.add_argument("--sparse-mode", default=SPARSE_DEFAULT.sparse_mode, choices=tuple(SPARSE_MODES),
                   help="what a sparse head runs: STREAM (sink + window) or BLOCK (XAttention block masks estimated "
                        "at prefill)")
    t.add_argument("--block-size", type=cli_args.positive_int, default=SPARSE_DEFAULT.block_size,
                   help="BLOCK mode: block size")
    t.add_argument("--xattn-threshold", type=cli_args.fraction, default=SPARSE_DEFAULT.xattn_threshold,
                   help="BLOCK mode: attention mass each query block keeps (the paper's training value)")
    t.add_argument("--loss-on", default="answer", choices=("answer", "all"),
                   help="LM loss on the answer tokens or on all tokens (the paper)")
    t.add_argument("--tau-schedule", default="code", choices=("code", "paper"),
                   help="Gumbel-softmax temperature: code = cosine 1.5 -> 1.0 over 60%% of the steps (the paper's "
                        "released code), paper = the exponential decay of the paper's text")
    t.add_argument("--router-lr", type=cli_args.positive_float, default=5e-4,
                   help="peak router LR (AdamW 0.9/0.95, wd 0.1)")
    t.add_argument("--lambda-lr", type=cli_args.positive_float, default=1e-3,
                   help="peak LR of the lambdas (gradient ascent)")
    t.add_argument("--paper-router", action="store_true",
                   help="the paper's router exactly: no input standardisation, no per-head logit bias")
    t.add_argument("--calibration-samples", type=cli_args.positive_int, default=64,
                   help="train prompts measured for the router input standardisation before step 1")
    t.add_argument("--save-every", type=cli_args.nonnegative_int, default=50,
                   help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--resume", type=_resume, default=None, metavar="DIR",
                   help="continue from a checkpoint dir (<out>/checkpoints/step_N), or 'auto' for the latest under "
                        "--out")
    t.add_argument("--init-routers", type=cli_args.router_dir, default=None, metavar="DIR",
                   help="fine-tune from a RouterSet dir (e.g. the shipped routers): its weights, input "
                        "standardisation and final lambdas (if saved), fresh optimizer; settings must match")
    t.add_argument("--fresh-lambdas", action="store_true",
                   help="with --init-routers: start the lambdas fresh instead of from the saved ones")
    t.add_argument("--micro-batch", type=cli_args.positive_int, default=1,
                   help="samples per forward on a rank (prompts left-padded, answers right-padded; same result as 1 "
                        "up to float rounding and the Gumbel noise draw, fewer kernel launches per sample)")
    t.add_argument("--full-branch", default="auto", choices=FULL_BRANCHES,
                   help="how the training mix runs: train_mix = the elastic train_mix op (both branches in one op, "
                        "each head's backward only in its routed branch), sdpa = O_FA from torch SDPA (cuDNN), op = "
                        "two elastic op calls; auto = train_mix where the Hopper backward serves the call (sm90 GPUs), "
                        "else sdpa for unpadded fp16/bf16 prompts and train_mix for padded micro-batches; op on CPU")
    t.add_argument("--num-workers", type=cli_args.nonnegative_int, default=4,
                   help="data-building worker processes per rank (0: build in the main process)")
    _common(t)
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="evaluate dense / elastic / static / all-sparse on the task suite",
                              description=EVAL_DESCRIPTION, formatter_class=cli_args.HelpFormatter)
    e.add_argument("--out", default="runs/router/eval", help="output dir (results JSON, report, plot)")
    e.add_argument("--routers", type=cli_args.router_dir, default=None, metavar="DIR",
                   help="RouterSet directory (from train-router: <out>/routers); needed by elastic and static")
    e.add_argument("--lengths", type=_lengths, default=(2048, 4096, 8192),
                   help="prompt lengths in tokens, comma-separated, each >= 128 (default 2048,4096,8192)")
    e.add_argument("--samples-per-task", type=cli_args.positive_int, default=8,
                   help="held-out prompts per task and length")
    e.add_argument("--calibration-per-task", type=cli_args.positive_int, default=2,
                   help="train-split prompts per task and length used to rank heads for the static policy")
    e.add_argument("--sparsity-shift", type=cli_args.finite_float, default=0.0,
                   help="elastic policy's inference budget knob (> 0 more heads sparse); static follows its MSR")
    e.add_argument("--max-new-tokens", type=cli_args.positive_int, default=32,
                   help="greedy tokens (stops at end of turn)")
    e.add_argument("--policies", type=_policies, default=("dense", "elastic", "static", "all_sparse"),
                   help="comma-separated policies to run (default dense,elastic,static,all_sparse)")
    e.add_argument("--report-from", type=cli_args.existing_file, default=None, metavar="EVAL_RESULTS_JSON",
                   help="no model run: re-aggregate this eval_results.json and rewrite its targets, report and plot")
    e.add_argument("--sink", type=cli_args.nonnegative_int, default=None,
                   help="STREAM sink tokens (default: the routers' config, else SparseConfig's)")
    e.add_argument("--window", type=cli_args.positive_int, default=None,
                   help="STREAM window tokens (default: the routers' config, else SparseConfig's)")
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
