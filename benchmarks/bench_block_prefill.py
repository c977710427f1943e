"""BLOCK (XAttention-style) heads at prefill: the mask estimate and the block-sparse attention, ours vs the peers a
user has, in one process (forward, bf16, causal, B=1).

Per (model shape, S):
  xattn_estimate   elastic_cuda.attention.xattn_block_mask (strided antidiagonal scores, block mass, row
                   selection at threshold 0.9): what the transformers backend runs per layer before BLOCK heads
  cudnn_dense      SDPA cuDNN over every head (the bar)
Per (model shape, S, density, MSR) with the same bool block mask [B, Hq, NB, NB] handed to everyone (sink block +
diagonal always, each other causal block kept with probability `density`; MSR = fraction of KV heads BLOCK, the
rest FULL, i.e. every causal block):
  ours_<strategy>  elastic_cuda.ops.attention with that strategy (head_mode FULL/BLOCK, block_size 128)
  flex_block       one compiled flex_attention call with the BlockMask made from the same mask (off-diagonal blocks
                   'full', diagonal blocks 'partial' with a causal mask_mod)
  serial           FULL heads -> cuDNN SDPA, BLOCK heads -> Flex, index_copy_ back (host-known routing)
  fa4_block        FlashAttention-4's block-sparse forward (PyPI flash-attn-4) on the same mask, causal
  serial_fa4       FULL heads -> FA4 dense, BLOCK heads -> FA4 block-sparse, index_copy_ back
  xattn_estimate_block_heads   the estimate for this routing's BLOCK heads only (est+ours_auto adds it to ours)
(fa4_dense per shape), and numeric checks ours vs Flex and vs FA4 (relative Frobenius error) per case. FA4 rows are
absent where flash-attn-4 is not installed. The mask is synthetic because random q/k give
a near-uniform estimate (every block kept); on SmolLM2 the estimate keeps ~30% of causal pairs (ESR 0.70,
benchmarks/results/router_training/2026-11-28_block_all_sparse_h200/).

Env: SEQS (default 8192,32768), MODELS (default llama,smollm2), DENSITIES (default 0.1,0.3), MSRS (default 0.5,1),
STRATEGIES (default auto,fused,grouped), BENCH_BUDGET_S (default 240). Writes block_prefill.json, block_prefill.md
and block_prefill.png under --out (default benchmarks/results/block_prefill/<date>_<gpu>/); `--from-json FILE` rewrites
the markdown and the plot from a saved run (no GPU). Run from the repository root:
`python -m benchmarks.bench_block_prefill`.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch.nn.attention import SDPBackend

from benchmarks.harness import (MODELS, RESULTS, T0, Case, env_list, fa4, flex_fn, grouped_bars, out_args, rec,
                                reference_lines, rel_err, routing, save_panels, sdpa, try_bench, write_with_errors)

BLK = 128


def random_block_mask(B, Hq, S, density, seed):
    """bool [B, Hq, NB, NB]: causal blocks; block 0 and the diagonal always, the others with prob. density."""
    nb = -(-S // BLK)
    g = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(B, Hq, nb, nb, generator=g, device="cuda") < density
    r = torch.arange(nb, device="cuda")
    causal = r.view(1, -1) <= r.view(-1, 1)
    forced = (r.view(1, -1) == 0) | (r.view(1, -1) == r.view(-1, 1))
    return (keep | forced) & causal


def with_full_heads(mask, head_mode, G):
    """The mask every method sees: FULL KV heads' query heads get every causal block."""
    nb = mask.shape[-1]
    r = torch.arange(nb, device=mask.device)
    causal = (r.view(1, -1) <= r.view(-1, 1)).expand_as(mask)
    full_q = (head_mode == 0).repeat_interleave(G, dim=1)[:, :, None, None]
    return torch.where(full_q, causal, mask)


def flex_block_mask(mask, S):
    """torch BlockMask of a bool block mask [B, H, NB, NB]: off-diagonal kept blocks are 'full' (no mask_mod),
    diagonal blocks 'partial' (causal mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = mask.shape[-1]
    r = torch.arange(nb, device=mask.device)
    diag = (r.view(1, -1) == r.view(-1, 1)).expand_as(mask)
    full = mask & ~diag

    def as_kv_blocks(sel):  # selected block indices first (ascending), then the rest
        order = (~sel).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
        return sel.sum(-1).to(torch.int32), order

    pn, pi = as_kv_blocks(mask & diag)
    fn, fi = as_kv_blocks(full)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=BLK, mask_mod=causal, seq_lengths=(S, S))


def fa4_block_tensors(mask, sparse_tensors_cls):
    """FA4's block-sparse description of a bool block mask [B, H, NB, NB] (Flex's layout: per query block the
    kept key blocks' count and indices): off-diagonal kept blocks 'full' (no mask), diagonal blocks 'mask' blocks,
    where FA4 applies causal=True."""
    nb = mask.shape[-1]
    r = torch.arange(nb, device=mask.device)
    diag = (r.view(1, -1) == r.view(-1, 1)).expand_as(mask)

    def as_kv_blocks(sel):
        order = (~sel).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
        return sel.sum(-1).to(torch.int32).contiguous(), order.contiguous()

    mc, mi = as_kv_blocks(mask & diag)
    fc, fi = as_kv_blocks(mask & ~diag)
    return sparse_tensors_cls(mask_block_cnt=mc, mask_block_idx=mi, full_block_cnt=fc, full_block_idx=fi,
                              block_size=(BLK, BLK))


def block_case(case, density, msr, strategies, seed):
    import elastic_cuda
    from elastic_cuda.attention.xattn import xattn_block_mask

    hm = routing(case.B, case.Hkv, msr, seed=seed)
    hm = torch.where(hm == 1, 2, 0).to(torch.int32)  # routing() gives 0/1: sparse heads are BLOCK here
    mask = with_full_heads(random_block_mask(case.B, case.Hq, case.S, density, seed), hm, case.G)
    nb = mask.shape[-1]
    causal_blocks = nb * (nb + 1) / 2
    kept = float(mask.float().sum(dim=(-1, -2)).mean()) / causal_blocks
    extra = dict(density=density, msr=msr, kept_block_fraction=round(kept, 4))

    def ours(strategy):
        return lambda: elastic_cuda.ops.attention(case.q, case.k, case.v, hm, block_mask=mask, block_size=BLK,
                                                  strategy=strategy)

    for s in strategies:
        try_bench(f"ours_{s}", case, lambda s=s: ours(s), (), **extra)
    flex, bm = flex_fn(), flex_block_mask(mask, case.S)
    try_bench("flex_block", case, lambda: (lambda: flex(case.qt, case.kt, case.vt, block_mask=bm, enable_gqa=True)),
              (), **extra)
    try:
        ref = flex(case.qt, case.kt, case.vt, block_mask=bm, enable_gqa=True).transpose(1, 2)
        rec(method="check_ours_vs_flex", **case.key(**extra), rel_err=rel_err(ours("auto")(), ref))
    except Exception as e:
        rec(method="check_ours_vs_flex", **case.key(**extra), error=repr(e)[:300])
    if 0 < msr < 1:
        try_bench("serial", case, lambda: serial(case, hm, mask), (), **extra)
    # The estimate for this routing's BLOCK heads only (what the backend runs per layer), as its own row; the
    # markdown adds it to ours_auto (est+ours).
    try_bench("xattn_estimate_block_heads", case,
              lambda: (lambda: xattn_block_mask(case.q, case.k, block_size=BLK, head_mode=hm)), (), **extra)
    peer = fa4()
    if peer is None:
        return
    fa_func, tensors_cls = peer
    bst = fa4_block_tensors(mask, tensors_cls)
    try_bench("fa4_block", case,
              lambda: (lambda: fa_func(case.q, case.k, case.v, causal=True, block_sparse_tensors=bst)), (), **extra)
    try:
        out = fa_func(case.q, case.k, case.v, causal=True, block_sparse_tensors=bst)
        rec(method="check_ours_vs_fa4", **case.key(**extra), rel_err=rel_err(ours("auto")(), out))
    except Exception as e:
        rec(method="check_ours_vs_fa4", **case.key(**extra), error=repr(e)[:300])
    if 0 < msr < 1:
        try_bench("serial_fa4", case, lambda: serial_fa4(case, hm, mask, fa_func, tensors_cls), (), **extra)


def serial(case, hm, mask):
    """FULL heads through cuDNN, BLOCK heads through Flex (their own BlockMask), scattered back; the routing is
    host-known (built once here), as a user gluing the two would do."""
    flex = flex_fn()
    G = case.G
    qh = (hm[0] == 2).repeat_interleave(G).nonzero().flatten()
    qf = (hm[0] == 0).repeat_interleave(G).nonzero().flatten()
    kh, kf = (hm[0] == 2).nonzero().flatten(), (hm[0] == 0).nonzero().flatten()
    bm = flex_block_mask(mask[:, qh], case.S)
    out = torch.empty_like(case.qt)

    def run():
        o_full = sdpa(case.qt[:, qf], case.kt[:, kf], case.vt[:, kf], SDPBackend.CUDNN_ATTENTION)
        o_block = flex(case.qt[:, qh], case.kt[:, kh], case.vt[:, kh], block_mask=bm, enable_gqa=True)
        out.index_copy_(1, qf, o_full)
        out.index_copy_(1, qh, o_block)
        return out
    return run


def serial_fa4(case, hm, mask, fa_func, tensors_cls):
    """FULL heads through FA4 dense, BLOCK heads through FA4 block-sparse, scattered back (host-known routing)."""
    G = case.G
    qh = (hm[0] == 2).repeat_interleave(G).nonzero().flatten()
    qf = (hm[0] == 0).repeat_interleave(G).nonzero().flatten()
    kh, kf = (hm[0] == 2).nonzero().flatten(), (hm[0] == 0).nonzero().flatten()
    bst = fa4_block_tensors(mask[:, qh].contiguous(), tensors_cls)
    out = torch.empty_like(case.q)

    def run():
        o_full = fa_func(case.q[:, :, qf], case.k[:, :, kf], case.v[:, :, kf], causal=True)
        o_block = fa_func(case.q[:, :, qh], case.k[:, :, kh], case.v[:, :, kh], causal=True,
                          block_sparse_tensors=bst)
        out.index_copy_(2, qf, o_full)
        out.index_copy_(2, qh, o_block)
        return out
    return run


def write_markdown(path, torch_version, gpu):
    lines = ["# BLOCK heads at prefill: XAttention mask estimate and block-sparse attention", "",
             f"torch {torch_version}, {gpu}, bf16, B=1, block {BLK}; median ms "
             "(speedup vs cuDNN dense at the same shape). density: probability an off-diagonal causal block is kept "
             "in a BLOCK head; MSR: fraction of KV heads BLOCK (the rest FULL). `python -m "
             "benchmarks.bench_block_prefill`.", ""]
    dense = {(r["model"], r["S"]): r["ms"] for r in RESULTS if r["method"] == "cudnn_dense" and "ms" in r}
    est = {(r["model"], r["S"]): r["ms"] for r in RESULTS if r["method"] == "xattn_estimate" and "ms" in r}
    methods = sorted({r["method"] for r in RESULTS if "density" in r and not r["method"].startswith("check_")
                      and r["method"] != "xattn_estimate_block_heads"}, key=lambda m: (not m.startswith("ours"), m))
    fa4_dense = {(r["model"], r["S"]): r["ms"] for r in RESULTS if r["method"] == "fa4_dense" and "ms" in r}
    for key in sorted(dense):
        model, S = key
        lines += [f"## {MODELS[model]['name']} shape, S={S}: cuDNN dense {dense[key]:.3f} ms, FA4 dense "
                  f"{fa4_dense.get(key, float('nan')):.3f} ms, xattn estimate (every head) "
                  f"{est.get(key, float('nan')):.3f} ms", "",
                  "| density | MSR | kept blocks | " + " | ".join(methods) + " | est+ours_auto | ours vs Flex / FA4 "
                  "rel. err |", "|---" * (len(methods) + 5) + "|"]
        cases = sorted({(r["density"], r["msr"]) for r in RESULTS if (r.get("model"), r.get("S")) == key
                        and "density" in r})
        for d, m in cases:
            row = {r["method"]: r for r in RESULTS if (r.get("model"), r.get("S"), r.get("density"), r.get("msr"))
                   == (model, S, d, m)}
            kept = next((r["kept_block_fraction"] for r in row.values()), float("nan"))
            cells = [f"{row[x]['ms']:.3f} ({dense[key] / row[x]['ms']:.2f}x)" if "ms" in row.get(x, {}) else "-"
                     for x in methods]
            chk = [row.get(c, {}).get("rel_err") for c in ("check_ours_vs_flex", "check_ours_vs_fa4")]
            chk = " / ".join("-" if c is None else f"{c:.1e}" for c in chk)
            e, o = row.get("xattn_estimate_block_heads", {}).get("ms"), row.get("ours_auto", {}).get("ms")
            both = "-" if e is None or o is None else f"{e + o:.3f} ({dense[key] / (e + o):.2f}x)"
            lines.append(f"| {d} | {m} | {kept:.3f} | " + " | ".join(cells) + f" | {both} | {chk} |")
        lines.append("")
    write_with_errors(path, lines)


def write_plot(path):
    """One panel per (shape, S): ms per (density, MSR) case for each method, cuDNN dense and the estimate as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["S"]) for r in RESULTS if r["method"] == "cudnn_dense" and "ms" in r})
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, (model, S) in zip(axes[0], keys):
        rows = [r for r in RESULTS if (r.get("model"), r.get("S")) == (model, S) and "ms" in r]
        cases = sorted({(r["density"], r["msr"]) for r in rows if "density" in r})
        methods = sorted({r["method"] for r in rows if "density" in r}, key=lambda m: (not m.startswith("ours"), m))
        grouped_bars(ax, [f"d{d:g}\nMSR {m:g}" for d, m in cases],
                     {m: [next((r["ms"] for r in rows if r["method"] == m and (r["density"], r["msr"]) == c),
                               float("nan")) for c in cases] for m in methods}, fontsize=8)
        reference_lines(ax, [(name, next((r["ms"] for r in rows if r["method"] == name), None), style)
                             for name, style in (("cudnn_dense", "k--"), ("xattn_estimate", "r:"))])
        ax.set_title(f"{MODELS[model]['name']} shape, S={S}", fontsize=9)
        ax.set_ylabel("ms (median)")
    save_panels(fig, axes, "BLOCK heads at prefill (bf16, B=1): d = off-diagonal block keep probability", path)


def main():
    args = out_args("block_prefill", __doc__.split("\n")[0], "block_prefill.md / .png")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        RESULTS.extend(saved["results"])
        write_markdown(os.path.join(args.out, "block_prefill.md"), saved["torch"], saved["gpu"])
        write_plot(os.path.join(args.out, "block_prefill.png"))
        return
    from elastic_cuda.attention.xattn import xattn_block_mask

    budget = float(os.environ.get("BENCH_BUDGET_S", 240))
    strategies = env_list("STRATEGIES", "auto,fused,grouped", str)
    seed = 0
    for model in env_list("MODELS", "llama,smollm2", str):
        for S in env_list("SEQS", "8192,32768"):
            if time.time() - T0 > budget:
                rec(method="skipped", model=model, S=S, reason="BENCH_BUDGET_S reached")
                continue
            c = Case(model, 1, S)
            try_bench("cudnn_dense", c, lambda: (lambda: sdpa(c.qt, c.kt, c.vt, SDPBackend.CUDNN_ATTENTION)), ())
            try_bench("xattn_estimate", c, lambda: (lambda: xattn_block_mask(c.q, c.k, block_size=BLK)), ())
            peer = fa4()
            if peer is not None:
                try_bench("fa4_dense", c, lambda: (lambda: peer[0](c.q, c.k, c.v, causal=True)), ())
            for density in env_list("DENSITIES", "0.1,0.3", float):
                for msr in env_list("MSRS", "0.5,1", float):
                    seed += 1
                    block_case(c, density, msr, strategies, seed)
    with open(os.path.join(args.out, "block_prefill.json"), "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": RESULTS}, f, indent=1)
    write_markdown(os.path.join(args.out, "block_prefill.md"), torch.__version__, torch.cuda.get_device_name())
    write_plot(os.path.join(args.out, "block_prefill.png"))
    print(open(os.path.join(args.out, "block_prefill.md")).read())


if __name__ == "__main__":
    main()
