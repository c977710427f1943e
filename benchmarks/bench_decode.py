"""Decode over the static elastic KV cache (H200, bf16, Llama-3.1-8B shape: Hq 32, Hkv 8, D 128), against the peers.

Sections:
  kernel    one decode step of one layer's attention (Sq 1) at S tokens per sample, batch B:
              ours_msr<m>     elastic_cuda.ops.decode_attention over ElasticStaticCache-layout pools, a fraction m
                              of each sample's KV heads STREAM (sink 128, window 2048, own random heads per sample)
                              (tensor-core kernel; ours_fma_msr<m>: the FMA kernel)
              sdpa_<backend>  torch SDPA (flash / cudnn / efficient) over the same dense cache viewed [B, Hkv, S, D]
                              (the all-FULL pool in slot order is exactly that tensor), enable_gqa
            with the KV bytes each one must read and the effective bandwidth (fraction of 4.8 TB/s HBM peak), and a
            numeric check of ours (all FULL) against cuDNN SDPA. Device time per call: every method's calls over
            enough copies of its cache to exceed L2 (as the layers of a model do), captured in one CUDA graph
            (time_ms: launch and Python overhead excluded on both sides).
  generate  greedy generation on a randomly initialised Llama-3.1-8B-shaped model, prompt S, batch B, N new
            tokens, each side's decode step captured once as a CUDA graph and replayed
            (elastic_cuda.integrations.generate.graphed_greedy_generate):
              dense          attn sdpa + transformers' StaticCache with a 2D mask over the static cache (the
                             correct way through transformers; but with a mask transformers repeats K/V to the 32
                             query heads per layer and SDPA runs a masked kernel: an unfair, slow peer)
              dense_nomask   the same without a mask: SDPA's GQA flash / cuDNN kernels over every slot, empty ones
                             included (timing bound of a dense SDPA decode; its tokens are not a correct decode)
              dense_ours     elastic_cuda.enable(policy all_full) + ElasticStaticCache: our decode op, every head
                             FULL (the same machinery as elastic, no STREAM head)
              elastic        elastic_cuda.enable(policy fixed, 6 of 8 KV heads STREAM per layer) + ElasticStaticCache
            decode tokens/s over the replayed steps (prefill and capture timed apart), peak memory and the caches'
            bytes; plus the capacity at S and 128K (requests whose KV fits beside the weights, bytes per request
            from the caches' own allocation: see capacity()).

Env: SEQS (default 32768,131072), BATCHES (default 1,8), MSRS (default 0,0.75), TARGETS (default none: extra
rows of ours with num_splits forced to each value, i.e. that many work items per launch), FMA_ROWS (default 1:
rows ours_fma_* of the FMA decode kernel, ELASTIC_DECODE_MMA=0, beside the tensor-core one), PLAN_ROWS (default 1:
rows ours_plan1_* with round 1's work plan, ELASTIC_DECODE_ONE_WAVE=0), GEN_SEQ (default 32768),
GEN_BATCHES
(default 8), GEN_TOKENS (default 32), GEN_SIDES (default dense,dense_nomask,dense_ours,elastic), SECTIONS (default kernel,generate), BENCH_BUDGET_S (default 240: a section
case that would start later is recorded as skipped). Writes decode.json, decode.md, decode.png under --out;
`--from-json FILE` rewrites the markdown and the plot from a saved run (no GPU).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from benchmarks.harness import (RESULTS, T0, env_list, event_median_ms, grouped_bars, kernel_switches, out_args,
                                rec)

DEV = "cuda"
HQ, HKV, D = 32, 8, 128
SINK, WINDOW = 128, 2048
HBM_PEAK = 4.8e12  # H200 bytes/s


def over_budget():
    return time.time() - T0 > float(os.environ.get("BENCH_BUDGET_S", "240"))


L2_FLUSH_BYTES = 256 << 20  # several times the H200's L2: calls over that many distinct bytes start cold


def time_ms(fns, rounds=10, reps=7):
    """Device time of one call, ms: the calls fns (one per copy of the cache, together >= L2_FLUSH_BYTES, so that each
    reads HBM as one layer of a model does: the other layers have flushed L2) captured back to back `rounds` times in
    one CUDA graph, median over `reps` replays of replay time / calls. A graph, not per-call events: a call timed
    alone also counts the host's time to launch it (the Python wrapper's checks are tens of microseconds, as long as
    the kernels at 32K). Returns (ms, how): per-call CUDA events only if capturing fails."""
    try:
        for f in fns:
            f()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for f in fns:
                    f()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / (rounds * len(fns)))
        del graph
        return sorted(times)[len(times) // 2], "graph"
    except Exception as e:  # a peer that cannot be captured: per-call events (include launch time)
        print(f"graph capture failed ({e!r:.200}); per-call events", file=sys.stderr)
        torch.cuda.synchronize()
        return sorted(event_median_ms(f, 20, 3) for f in fns)[len(fns) // 2], "events"


# ----------------------------------------------------------------------------- kernel
def routing(B, msr, seed):
    """int32 [B, HKV]: round(msr * HKV) STREAM heads per sample, each sample its own random heads."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, HKV, dtype=torch.int32)
    for b in range(B):
        m[b, torch.randperm(HKV, generator=g)[:round(msr * HKV)]] = 1
    return m


def pools(B, S, modes, gen):
    """The static cache's layout: whole-history pool for FULL pairs, STREAM pool (sink + ring), slot table."""
    whole = modes == 0
    n_w, n_s = int(whole.sum()), int((~whole).sum())
    ring_tokens = SINK + WINDOW  # + Sq - 1 with Sq = 1
    fk = torch.randn(n_w, S, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    fv = torch.randn(n_w, S, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    sk = torch.randn(n_s, ring_tokens, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    sv = torch.randn(n_s, ring_tokens, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    flat = whole.flatten()
    slot = torch.where(flat, flat.long().cumsum(0) - 1, (~flat).long().cumsum(0) - 1).view(B, HKV).int()
    keys_read = n_w * S + n_s * min(S, SINK + WINDOW)
    return (fk, fv, sk, sv, modes.to(DEV), slot.to(DEV)), 2 * keys_read * D * 2


def kernel_section(seqs, batches, msrs, targets=(), fma_rows=True, plan_rows=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from elastic_cuda.ops import decode_attention

    if os.environ.get("ELASTIC_DECODE_MMA"):
        sys.exit("bench_decode: unset ELASTIC_DECODE_MMA (the kernel section times both decode kernels itself)")
    if os.environ.get("ELASTIC_DECODE_ONE_WAVE"):
        sys.exit("bench_decode: unset ELASTIC_DECODE_ONE_WAVE (the kernel section times both work plans itself)")
    for S in seqs:
        for B in batches:
            if over_budget():
                rec(section="kernel", S=S, B=B, skipped="budget")
                continue
            gen = torch.Generator(DEV).manual_seed(S + B)
            q = torch.randn(B, 1, HQ, D, device=DEV, dtype=torch.bfloat16, generator=gen)
            lens = torch.full((B,), S, dtype=torch.int32, device=DEV)
            dense_ms = None
            for msr in msrs:
                try:
                    modes_cpu = routing(B, msr, seed=S + B)
                    tensors, nbytes = pools(B, S, modes_cpu, gen)
                    copies = [tensors] + [pools(B, S, modes_cpu, gen)[0]
                                          for _ in range(math.ceil(L2_FLUSH_BYTES / nbytes) - 1)]

                    def ours(t, num_splits=0):
                        fk, fv, sk, sv, modes, slot = t
                        return decode_attention(q, fk, fv, sk, sv, modes, slot, lens, sink=SINK, window=WINDOW,
                                                num_splits=num_splits)

                    def row(method, ms, how):
                        rec(section="kernel", method=method, S=S, B=B, msr=msr, ms=ms, kv_bytes=nbytes,
                            tb_per_s=nbytes / ms / 1e9, hbm_frac=nbytes / ms / 1e-3 / HBM_PEAK, timing=how,
                            copies=len(copies), vs_ours_dense=None if dense_ms is None else ms / dense_ms)

                    ms, how = time_ms([lambda t=t: ours(t) for t in copies])
                    dense_ms = ms if msr == 0 else dense_ms
                    row(f"ours_msr{msr:g}", ms, how)
                    if fma_rows:  # the FMA kernel on the same calls (ELASTIC_DECODE_MMA=0, kernel_options.h)
                        with kernel_switches(ELASTIC_DECODE_MMA="0"):
                            row(f"ours_fma_msr{msr:g}", *time_ms([lambda t=t: ours(t) for t in copies]))
                    if plan_rows:  # round 1's work plan on the same calls (ELASTIC_DECODE_ONE_WAVE=0, kernel_options.h)
                        with kernel_switches(ELASTIC_DECODE_ONE_WAVE="0"):
                            row(f"ours_plan1_msr{msr:g}", *time_ms([lambda t=t: ours(t) for t in copies]))
                    for target in targets:  # forced work-item targets (tuning: the automatic one is one wave)
                        row(f"ours_msr{msr:g}_t{target}", *time_ms([lambda t=t: ours(t, target) for t in copies]))
                    if msr == 0:
                        qt = q.transpose(1, 2)  # [B, HQ, 1, D]
                        kv = [(t[0].view(B, HKV, S, D), t[1].view(B, HKV, S, D)) for t in copies]
                        ref = None
                        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                            try:
                                def peer(k4, v4, be=be):
                                    with sdpa_kernel(be):
                                        return scaled_dot_product_attention(qt, k4, v4, enable_gqa=True)
                                out = peer(*kv[0])
                                ref = out if ref is None else ref
                                pms, phow = time_ms([lambda k4=k4, v4=v4: peer(k4, v4) for k4, v4 in kv])
                                rec(section="kernel", method=f"sdpa_{name}", S=S, B=B, msr=0.0, ms=pms,
                                    kv_bytes=nbytes, tb_per_s=nbytes / pms / 1e9,
                                    hbm_frac=nbytes / pms / 1e-3 / HBM_PEAK, timing=phow, copies=len(copies))
                            except Exception as e:  # a backend without GQA decode support on this build
                                rec(section="kernel", method=f"sdpa_{name}", S=S, B=B, msr=0.0, error=repr(e)[:300])
                        if ref is not None:
                            got = ours(copies[0]).transpose(1, 2).double()
                            err = ((got - ref.double()).norm() / ref.double().norm()).item()
                            rec(section="kernel", method="check_ours_vs_sdpa", S=S, B=B, rel_err=err)
                    del tensors, copies
                except Exception as e:
                    rec(section="kernel", method=f"ours_msr{msr:g}", S=S, B=B, msr=msr, error=repr(e)[:300])
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- generate
def llama8b(dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=140000,
                      attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def capacity(S, msr, weights_bytes, new_tokens=16):
    """Requests of S prompt tokens (+ new_tokens) whose KV cache fits in the GPU memory left beside the weights
    (90% of the device's memory, the rest kept for activations and the allocator). Bytes per request come from the
    caches' own accounting, not a formula: ElasticStaticCache's pools (_Pool, the class the cache allocates, built on
    the meta device: exact bytes, no memory) with round(msr * HKV) pairs per layer STREAM, and transformers'
    StaticCache layout (2 x Hkv x max_cache_len x D per layer, what ElasticStaticLayer.dense_memory_bytes gives)."""
    from elastic_cuda.integrations.static_cache import _Pool

    total = torch.cuda.get_device_properties(0).total_memory
    free = total * 0.9 - weights_bytes
    max_len = S + new_tokens
    n_stream = round(msr * HKV)
    stream_len = SINK + WINDOW + 16 - 1  # the cache's default max_query_len (16)
    per_layer = (_Pool(HKV - n_stream, max_len, D, torch.bfloat16, "meta").nbytes() +
                 _Pool(n_stream, stream_len, D, torch.bfloat16, "meta").nbytes())
    elastic = 32 * per_layer
    dense = 32 * 2 * HKV * max_len * D * 2
    return dict(total_bytes=total, free_bytes=free, dense_request_bytes=dense, elastic_request_bytes=elastic,
                dense_requests=int(free // dense), elastic_requests=int(free // elastic))


GEN_SIDES = ("dense", "dense_nomask", "dense_ours", "elastic")


def generate_section(S, batches, new_tokens, sides=GEN_SIDES):
    """Decode tokens/s of the 8B-shaped model, each side's decode step captured once as a CUDA graph and replayed
    (elastic_cuda.integrations.generate.graphed_greedy_generate): dense = SDPA over transformers' StaticCache,
    elastic = the decode op over ElasticStaticCache with 6 of 8 KV heads STREAM in every layer; dense_nomask and
    dense_ours: the fairer dense peers (module docstring)."""
    from transformers import StaticCache

    import elastic_cuda
    from elastic_cuda.integrations.generate import graphed_greedy_generate
    from elastic_cuda.integrations.static_cache import ElasticStaticCache

    model = llama8b()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    table = torch.zeros(32, HKV, dtype=torch.bool)
    for layer in range(32):
        table[layer, torch.randperm(HKV, generator=torch.Generator().manual_seed(layer))[:6]] = True
    for cap_s in (S, 131072):
        rec(section="capacity", S=cap_s, msr=0.75, weights_bytes=weights, **capacity(cap_s, 0.75, weights))
    for B in batches:
        if over_budget():
            rec(section="generate", S=S, B=B, skipped="budget")
            continue
        ids = torch.randint(3, 128256, (B, S), device=DEV, generator=torch.Generator(DEV).manual_seed(B))
        for side in sides:
            cache = None
            try:
                if side in ("dense", "dense_nomask"):
                    elastic_cuda.disable(model)
                    model.set_attn_implementation("sdpa")
                    cache = StaticCache(config=model.config, max_cache_len=S + new_tokens + 1)
                elif side == "dense_ours":
                    elastic_cuda.enable(model, policy="all_full", sink=SINK, window=WINDOW)
                    cache = ElasticStaticCache(model, max_batch_size=B, max_cache_len=S + new_tokens + 1)
                elif side == "elastic":
                    elastic_cuda.enable(model, policy="fixed", fixed_table=table, sink=SINK, window=WINDOW)
                    cache = ElasticStaticCache(model, max_batch_size=B, max_cache_len=S + new_tokens + 1)
                else:
                    raise ValueError(f"GEN_SIDES: unknown side {side!r} (one of {GEN_SIDES})")
                torch.cuda.reset_peak_memory_stats()
                run = graphed_greedy_generate(model, ids, cache, new_tokens, dense_mask=side != "dense_nomask")
                peak = torch.cuda.max_memory_allocated()
                cache_bytes = (cache.memory_bytes() if isinstance(cache, ElasticStaticCache) else
                               sum(t.numel() * t.element_size() for layer in cache.layers
                                   for t in (layer.keys, layer.values) if t is not None))
                rec(section="generate", side=side, S=S, B=B, new_tokens=new_tokens,
                    tokens_per_s=run.decode_tokens_per_s(), step_ms=1e3 * run.decode_s / run.replayed_steps,
                    replayed_steps=run.replayed_steps, prefill_s=run.prefill_s, capture_s=run.capture_s,
                    peak_bytes=peak, cache_bytes=cache_bytes, weights_bytes=weights,
                    first_tokens=run.tokens[0, :4].tolist())
                del run
            except Exception as e:
                rec(section="generate", side=side, S=S, B=B, error=repr(e)[:300])
            del cache
            torch.cuda.empty_cache()
    elastic_cuda.disable(model)


# ----------------------------------------------------------------------------- reports
def write_markdown(path, results, command):
    kern = [r for r in results if r.get("section") == "kernel" and "ms" in r]
    lines = ["# Decode over the static elastic KV cache (bf16, Llama-3.1-8B shape, one layer, Sq 1)", "",
             f"Command: `{command}`", "",
             "| S | B | method | ms | KV bytes | TB/s | of HBM peak | vs ours dense |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(kern, key=lambda r: (r["S"], r["B"], r["method"])):
        rel = "" if r.get("vs_ours_dense") is None else f"{r['vs_ours_dense']:.3f}x"
        lines.append(f"| {r['S']} | {r['B']} | {r['method']} | {r['ms']:.4f} | {r['kv_bytes'] / 1e6:.1f} MB | "
                     f"{r['tb_per_s']:.2f} | {r['hbm_frac']:.0%} | {rel} |")
    checks = [r for r in results if r.get("method") == "check_ours_vs_sdpa"]
    if checks:
        lines += ["", "Numeric check, ours (all FULL) vs SDPA, relative Frobenius error: " +
                  ", ".join(f"S {r['S']} B {r['B']}: {r['rel_err']:.1e}" for r in checks)]
    gen = [r for r in results if r.get("section") == "generate" and "tokens_per_s" in r]
    if gen:
        lines += ["", "## generate (Llama-3.1-8B-shaped random model, greedy, each side's decode step one captured "
                  "CUDA graph)", "",
                  "dense: SDPA through transformers with the static cache's mask (repeat_kv + masked kernel: slow); "
                  "dense_nomask: SDPA's GQA kernel over every slot (timing only, tokens not a correct decode); "
                  "dense_ours: our decode op, every head FULL.", "",
                  "| S | B | side | decode tokens/s | ms/step | vs dense | vs dense_nomask | vs dense_ours | peak GB "
                  "| cache GB |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        bases = {side: {(r["S"], r["B"]): r["tokens_per_s"] for r in gen if r["side"] == side}
                 for side in ("dense", "dense_nomask", "dense_ours")}
        order = {s: i for i, s in enumerate(GEN_SIDES)}
        for r in sorted(gen, key=lambda r: (r["S"], r["B"], order.get(r["side"], len(order)))):
            rels = []
            for side in ("dense", "dense_nomask", "dense_ours"):
                base = bases[side].get((r["S"], r["B"]))
                rels.append(f"{r['tokens_per_s'] / base:.2f}x" if base else "")
            lines.append(f"| {r['S']} | {r['B']} | {r['side']} | {r['tokens_per_s']:.1f} | {r.get('step_ms', 0):.2f} | "
                         f"{' | '.join(rels)} | {r['peak_bytes'] / 1e9:.1f} | {r['cache_bytes'] / 1e9:.2f} |")
    for r in results:
        if r.get("section") == "capacity":
            ratio = r["elastic_requests"] / max(r["dense_requests"], 1)
            lines += ["", f"Capacity at {r['S']} tokens (weights {r['weights_bytes'] / 1e9:.1f} GB, 90% of "
                      f"{r['total_bytes'] / 1e9:.0f} GB for weights + KV; per request dense "
                      f"{r['dense_request_bytes'] / 1e9:.2f} GB, elastic "
                      f"{r['elastic_request_bytes'] / 1e9:.2f} GB from "
                      f"the caches' allocation): dense {r['dense_requests']} requests, elastic at MSR {r['msr']} "
                      f"{r['elastic_requests']} ({ratio:.1f}x)"]
    bad = [r for r in results if "error" in r or "skipped" in r]
    if bad:
        lines += ["", "## Errors and skipped cases", "", "```"] + [json.dumps(r)[:400] for r in bad] + ["```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    kern = [r for r in results if r.get("section") == "kernel" and "ms" in r]
    if not kern:  # a generate-only run: nothing to plot (an empty figure's legend warned "No artists with labels")
        return
    cases = sorted({(r["S"], r["B"]) for r in kern})
    methods = sorted({r["method"] for r in kern})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    grouped_bars(ax, [f"S={s // 1024}K B={b}" for s, b in cases],
                 {m: [next((r["hbm_frac"] for r in kern if (r["S"], r["B"]) == c and r["method"] == m), 0)
                      for c in cases] for m in methods})
    ax.axhline(0.75, color="k", ls="--", lw=0.8)
    ax.set_ylabel("KV bytes / time, fraction of 4.8 TB/s")
    ax.set_title("Decode attention, one layer, Llama-3.1-8B shape, bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = out_args("decode", __doc__.split("\n")[0], "decode.md / decode.png")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        write_markdown(os.path.join(args.out, "decode.md"), saved["results"], saved["command"])
        write_plot(os.path.join(args.out, "decode.png"), saved["results"])
        return
    if not torch.cuda.is_available():
        sys.exit("bench_decode: needs a CUDA device (use --from-json to rebuild reports)")
    command = "python " + " ".join(sys.argv)
    env = {k: os.environ[k] for k in ("SEQS", "BATCHES", "MSRS", "TARGETS", "FMA_ROWS", "PLAN_ROWS", "GEN_SEQ", "GEN_BATCHES",
                                      "GEN_TOKENS", "GEN_SIDES", "SECTIONS",
                                      "BENCH_BUDGET_S") if k in os.environ}
    if env:
        command = " ".join(f"{k}={v}" for k, v in env.items()) + " " + command
    sections = env_list("SECTIONS", "kernel,generate", str)
    try:
        if "kernel" in sections:
            kernel_section(env_list("SEQS", "32768,131072"), env_list("BATCHES", "1,8"),
                           env_list("MSRS", "0,0.75", float), env_list("TARGETS", "", int),
                           os.environ.get("FMA_ROWS", "1") == "1", os.environ.get("PLAN_ROWS", "1") == "1")
        if "generate" in sections:
            generate_section(int(os.environ.get("GEN_SEQ", "32768")), env_list("GEN_BATCHES", "8"),
                             int(os.environ.get("GEN_TOKENS", "32")), env_list("GEN_SIDES", ",".join(GEN_SIDES), str))
    finally:
        meta = {"command": command, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "results": RESULTS}
        with open(os.path.join(args.out, "decode.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        write_markdown(os.path.join(args.out, "decode.md"), RESULTS, command)
        write_plot(os.path.join(args.out, "decode.png"), RESULTS)


if __name__ == "__main__":
    main()
