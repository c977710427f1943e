"""MSR of the shipped SmolLM2 routers as a function of the inference budget knob `sparsity_shift`, per task
category, on held-out prompts (prefill only: routing, no generation; CPU is enough).

  python -m experiments.router_shift_sweep --lengths 2048 --samples-per-task 2 --shifts=-16,-8,-4,-2,0,2,4,8 \
      --out benchmarks/results/router_training/<date>_shift_sweep_cpu/shift_sweep_cpu.md
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from elastic_cuda.integrations.transformers import enable
from elastic_cuda.router import RouterSet
from elastic_cuda.training.data import TASK_CATEGORY, DataConfig, TaskDataset
from elastic_cuda.training.models import load_model_and_tokenizer

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elastic_cuda", "routers",
                       "smollm2-135m-instruct")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default=SHIPPED)
    p.add_argument("--lengths", default="2048")
    p.add_argument("--samples-per-task", type=int, default=2)
    p.add_argument("--shifts", default="-2,-1,0,1,2")
    p.add_argument("--out", default=None, help="markdown file (printed either way)")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lengths = tuple(int(x) for x in args.lengths.split(","))
    shifts = [float(x) for x in args.shifts.split(",")]
    model, tok = load_model_and_tokenizer("smollm2", torch.device("cpu"), torch.float32, 0)
    routers = RouterSet.load(args.routers, model=model)
    rc = routers.config
    data = TaskDataset(tok, split="eval", seed=1,
                       config=DataConfig(lengths=lengths, local_window=rc["window"], sink=rc["sink"]))
    samples = data.eval_samples(lengths, args.samples_per_task)
    state = enable(model, routers, policy="router")
    rows = []
    t0 = time.perf_counter()
    for shift in shifts:
        state.sparsity_shift = shift
        msr = {"sensitive": [], "robust": []}
        with torch.no_grad():
            for s in samples:
                model(input_ids=torch.tensor([s.prompt_ids]), use_cache=False, logits_to_keep=1)
                msr[TASK_CATEGORY[s.task]].append(state.metrics()["msr"])
        sen = sum(msr["sensitive"]) / len(msr["sensitive"])
        rob = sum(msr["robust"]) / len(msr["robust"])
        rows.append(f"| {shift:+g} | {sen:.3f} | {rob:.3f} | {rob - sen:+.3f} |")
        print(rows[-1], flush=True)
    lines = [f"# sparsity_shift sweep of `{os.path.relpath(args.routers)}` on SmolLM2-135M-Instruct (CPU, fp32)", "",
             f"Held-out prompts (eval split), lengths {list(lengths)}, {args.samples_per_task} per task and length "
             f"({len(samples)} prompts), prefill routing only; {time.perf_counter() - t0:.0f} s.",
             f"Command: `python -m experiments.router_shift_sweep --lengths {args.lengths} --samples-per-task "
             f"{args.samples_per_task} --shifts={args.shifts}`", "",
             "| shift | MSR sensitive | MSR robust | gap |", "|---|---|---|---|"] + rows
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
