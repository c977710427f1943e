"""Router-training attention cost: forward + backward of the training mix O = z*O_FA + (1-z)*O_SA
(attention.train_mix_attention) three ways: `op` (two elastic op calls with autograd, the reference), `sdpa` (O_FA
from torch SDPA; `auto` takes it for unpadded CUDA batches) and `train_mix` (the elastic train_mix op: both
branches in one op, each head's backward only in the branch its hard z picks). Beside them, one dense causal
forward + backward of the same shape: the elastic op with every head FULL and torch SDPA (cuDNN / FlashAttention).

  python -m benchmarks.bench_train_mix                       SmolLM2-135M shape, 1K-8K, B 1 and a padded B 2
  MODEL=llama LENGTHS=8192,32768 PADDED=0 python -m benchmarks.bench_train_mix     Llama-3.1-8B attention shape
  python -m benchmarks.bench_train_mix --from-json <dir>/train_mix.json            rewrite the table and plot

Routing: z hard 0/1, round(MSR * Hkv) KV heads sparse (STREAM) per sample, chosen at random per sample, for each
MSR of MSRS (default 0.25,0.5,0.75: the sweep that checks `auto`'s rule; MSR=x runs one; the trainer's z is a
straight-through hard sample). SmolLM2 has 3 KV heads, so 0.5 and 0.75 both route 2 of 3 sparse: MSRS=0.34,0.67,1
covers its 1, 2 and 3 (the table gives the count). The `auto` column says what full_branch="auto" picks for the row's call
(attention.hybrid._resolve_branch). Timings: triton do_bench medians (CUDA-event medians without triton) of one
layer, with a fixed random upstream gradient; fresh random inputs per shape. Errors: max |x - op| / max |op| of the
output and the gradients of q, k, v and z. BUDGET_S (seconds from the start of the process, default none;
harness.TimeBudget): a case that would end past it is not started and is listed as skipped. `train_mix torch`: the
train_mix op with ELASTIC_TRAIN_MIX_FUSED=0 (its output mix, dz and gradient sums as torch elementwise ops instead of
the fused kernels of csrc/train_mix/), the A/B of those kernels; CUDA fp16/bf16 runs them by default.
"""
from __future__ import annotations

import json
import os
import time

import torch

from benchmarks.harness import MODELS, TimeBudget, env_list, grouped_bars, kernel_switches, median_ms, out_args, sdpa
from elastic_cuda.attention import PaddingLayout, train_mix_attention
from elastic_cuda.attention.hybrid import _resolve_branch
from elastic_cuda.ops import FULL, STREAM, attention

BRANCHES = ("op", "sdpa", "train_mix")
SINK_WINDOW = {"smollm2": (64, 512), "llama": (128, 2048)}  # the shipped SmolLM2 routers' / the issues' settings


def make(model, B, S, padded, msr, seed):
    m = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape_q, shape_kv = (B, S, m["Hq"], m["D"]), (B, S, m["Hkv"], m["D"])
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=g)
    gc = torch.Generator().manual_seed(seed)
    z = torch.ones(B, m["Hkv"])
    for b in range(B):
        z[b, torch.randperm(m["Hkv"], generator=gc)[:round(msr * m["Hkv"])]] = 0.0
    padding = None
    if padded:  # a micro-batch: the shorter sample left-padded by a quarter of S
        mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
        mask[-1, : S // 4] = False
        padding = PaddingLayout.from_mask(mask, S, S)
    return q, k, v, z.cuda(), grad, padding


def run_mix(branch, case, sink, window, want_grads=False):
    q, k, v, z, grad, padding = case
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, z)]
    out = train_mix_attention(*leaves[:3], leaves[3], STREAM, sink=sink, window=window, padding=padding,
                              full_branch=branch)
    out.backward(grad)
    if want_grads:
        return [out.detach().float()] + [t.grad.float() for t in leaves]
    return None


def run_dense(kind, case):
    q, k, v, _, grad, _ = case
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    if kind == "elastic":
        mode = torch.full((q.shape[0], k.shape[2]), FULL, dtype=torch.int32, device=q.device)
        out = attention(*leaves, mode)
    else:
        from torch.nn.attention import SDPBackend

        backend = SDPBackend.CUDNN_ATTENTION if kind == "cudnn" else SDPBackend.FLASH_ATTENTION
        out = sdpa(*(t.transpose(1, 2) for t in leaves), backend).transpose(1, 2)
    out.backward(grad)


def _msr_text(meta) -> str:
    msrs = meta.get("msrs", [meta.get("msr")])  # (files of the single-MSR version carry "msr")
    return " / ".join(f"{m:g}" for m in msrs)


def table(meta, results):
    rows = [f"# Training-mix attention, one layer, forward + backward ({meta['device']}, torch {meta['torch']}, "
            "bf16)", "",
            f"{meta['model_name']} attention shape: {meta['Hq']} query / {meta['Hkv']} KV heads, head_dim "
            f"{meta['D']}; STREAM sink {meta['sink']}, window {meta['window']}; hard z with MSR {_msr_text(meta)} "
            "(that fraction of each sample's KV heads sparse, random per sample). `op`: two elastic op calls with "
            "autograd; `sdpa`: O_FA from torch SDPA; `train_mix`: the train_mix op; `auto`: what "
            "full_branch=\"auto\" picks for the call. Dense: one causal forward + backward with every head FULL (the "
            "elastic op; torch SDPA on cuDNN). Errors: max |x - op| / max |op| of out / dq / dk / dv / dz.",
            f"Command: `{meta['command']}`", "",
            "| B | S | padded | MSR | auto | op ms | sdpa ms | train_mix ms | train_mix torch ms | fastest mix | "
            "dense elastic ms | dense cuDNN ms | train_mix / dense elastic | train_mix / dense cuDNN | err sdpa | "
            "err train_mix |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
    errs = lambda e: " / ".join(f"{x:.1e}" for x in e.values())  # noqa: E731
    for r in results:
        msr = r.get("msr", meta.get("msr"))
        sparse_heads = f"{round(msr * meta['Hkv'])}/{meta['Hkv']}"  # what make() routes sparse per sample
        head = f"| {r['B']} | {r['S']} | {'yes' if r['padded'] else 'no'} | {msr:g} ({sparse_heads}) | " \
               f"{r.get('auto', '-')} |"
        if "skipped" in r:
            rows.append(head + f" {r['skipped']} |" + " |" * 10)
            continue
        ms = r["ms"]
        mixes = {b: ms[b] for b in BRANCHES if ms.get(b) is not None}
        fastest = min(mixes, key=mixes.get) if mixes else "-"
        rows.append(head + f" {fmt(ms['op'])} | {fmt(ms['sdpa'])} | {fmt(ms['train_mix'])} | "
                    f"{fmt(ms.get('train_mix_torch'))} | {fastest} | "
                    f"{fmt(ms.get('dense_elastic'))} | {fmt(ms.get('dense_cudnn'))} | "
                    f"{ratio(ms['train_mix'], ms.get('dense_elastic'))} | "
                    f"{ratio(ms['train_mix'], ms.get('dense_cudnn'))} | {errs(r['err']['sdpa'])} | "
                    f"{errs(r['err']['train_mix'])} |")
    return "\n".join(rows) + "\n"


def plot(meta, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if "ms" in r]
    series = list(BRANCHES) + ["train_mix_torch", "dense_elastic", "dense_cudnn"]
    labels = [f"B{r['B']} S{r['S']}{' pad' if r['padded'] else ''}\nMSR {r.get('msr', meta.get('msr')):g}"
              for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(results)), 4.4))
    grouped_bars(ax, labels, {s: [r["ms"].get(s) or 0 for r in results] for s in series}, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms, forward + backward (log)")
    ax.set_title(f"Training mix vs dense, {meta['model_name']} shape, MSR {_msr_text(meta)}, {meta['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_case(model, B, S, padded, msr, sink, window):
    case = make(model, B, S, padded, msr, seed=S + B)
    q, k, _, _, _, padding = case
    auto = _resolve_branch("auto", q, k, padding)
    grads = {b: run_mix(b, case, sink, window, want_grads=True) for b in BRANCHES}
    err = {b: {n: float((a - r).abs().max() / r.abs().max().clamp_min(1e-30))
               for n, a, r in zip(("out", "dq", "dk", "dv", "dz"), grads[b], grads["op"])}
           for b in ("sdpa", "train_mix")}
    del grads
    ms = {b: median_ms(lambda b=b: run_mix(b, case, sink, window)) for b in BRANCHES}
    with kernel_switches(ELASTIC_TRAIN_MIX_FUSED="0"):  # the A/B of the fused elementwise kernels
        ms["train_mix_torch"] = median_ms(lambda: run_mix("train_mix", case, sink, window))
    if not padded:
        ms["dense_elastic"] = median_ms(lambda: run_dense("elastic", case))
        ms["dense_cudnn"] = median_ms(lambda: run_dense("cudnn", case))
    return {"B": B, "S": S, "padded": padded, "msr": msr, "auto": auto, "ms": ms, "err": err}


def main():
    args = out_args("train_mix", __doc__, "train_mix.md / train_mix.png")
    md, js, png = (os.path.join(args.out, "train_mix" + ext) for ext in (".md", ".json", ".png"))
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        meta, results = saved["meta"], saved["results"]
    else:
        model = os.environ.get("MODEL", "smollm2")
        lengths = env_list("LENGTHS", "1024,2048,4096,8192")
        msrs = env_list("MSRS", os.environ.get("MSR", "0.25,0.5,0.75"), float)
        budget = TimeBudget.from_env()
        batches = ((1, False), (2, True)) if os.environ.get("PADDED", "1") == "1" else ((1, False),)
        sink, window = SINK_WINDOW[model]
        m = MODELS[model]
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=model, model_name=m["name"],
                    Hq=m["Hq"], Hkv=m["Hkv"], D=m["D"], sink=sink, window=window, msrs=msrs,
                    command=f"MODEL={model} LENGTHS={','.join(map(str, lengths))} "
                            f"MSRS={','.join(f'{x:g}' for x in msrs)} PADDED={os.environ.get('PADDED', '1')} "
                            f"python -m benchmarks.bench_train_mix")
        results = []
        for B, padded in batches:
            for S in lengths:
                for msr in msrs:
                    if not budget.allows(S):
                        results.append({"B": B, "S": S, "padded": padded, "msr": msr,
                                        "skipped": f"skipped: BUDGET_S={budget.seconds:g}"})
                        print(json.dumps(results[-1]), flush=True)
                        continue
                    start = time.time()
                    results.append(measure_case(model, B, S, padded, msr, sink, window))
                    budget.took(S, time.time() - start)
                    print(json.dumps(results[-1]), flush=True)
                    torch.cuda.empty_cache()
                    with open(js, "w") as f:  # after every case: a run stopped from outside keeps what it measured
                        json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(js, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    text = table(meta, results)
    with open(md, "w") as f:
        f.write(text)
    plot(meta, results, png)
    print(text)


if __name__ == "__main__":
    main()
