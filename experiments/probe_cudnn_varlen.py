"""One-shot GPU probe for the grouped attention strategy (pure PyTorch, no extension build).

Answers, on the GPU machine's torch:
  1. the schema of aten::_cudnn_attention_forward / _flash_attention_forward;
  2. whether cuDNN varlen (THD, cum_seq_q/k) accepts trailing zero-length sequences and GQA inside
     a sequence (G q heads over 1 kv head), what lse layout it returns, and that it matches dense SDPA;
  3. its speed at 32K (Llama 32q/8kv, D128) with 25/50/100% of the kv heads FULL, against dense
     cuDNN SDPA over all heads, and FA2 varlen for the fallback;
  4. whether FlexAttention compiles a token-exact streaming mask_mod with an analytic BlockMask.
Prints one JSON line per finding and a summary. Env: OUT (dir for probe.jsonl), PROBE_S (default 32768).

Findings on one H200 (torch 2.11.0+cu130, cuDNN 9.x, triton 3.6), 2026-11-28:
  - schemas: torch 2.11 _cudnn_attention_forward has no seqused_k/block_table kwargs (2.14 has); the first 12
    positional args + scale= are common to both. _flash_attention_forward: 2.14 adds block_table/num_splits
    after alibi_slopes; positional args up to scale are common.
  - cuDNN varlen: correct (out rel err 2.0e-3 vs fp32 math, lse 6e-8) with GQA inside a sequence (G q heads
    over 1 kv head), trailing zero-length sequences, ragged S=1000, D 64 and 128; lse is [T, Hq, 1].
    But ~59-72 ms per call at 32K whatever n_full is (50 ms with every sequence empty): the nested-tensor path
    rebuilds its cuDNN graph on every call (it looks the MHA graph cache up but never inserts). Unusable.
  - FA2 varlen (same packed buffers, GQA, trailing empties): correct, lse [Hq, T]; 6.59 / 12.73 / 24.92 ms for
    2 / 4 / 8 of 8 kv heads FULL at 32K = 334-353 TFLOP/s. Dense SDPA at 32K: cuDNN 15.06 ms (584 TFLOP/s),
    FA2 25.27 ms (348). torch index_select gather of the FULL heads: 0.22 / 0.44 / 0.70 ms.
  - Flex with a token-exact streaming mask_mod and an analytic BlockMask compiles (5.4 s), rel err 2.0e-3 vs
    fp32 math at S=1024; 32K MSR 0.5 runs in 11.45 ms (anchor block-granular Flex: 11.67 ms).
"""
import json
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

OUT = os.environ.get("OUT", "/tmp")
dev = "cuda"
T0 = time.time()
findings = []


def rec(**kw):
    kw["t"] = round(time.time() - T0, 1)
    findings.append(kw)
    line = json.dumps(kw, default=str)
    print(line, flush=True)
    with open(os.path.join(OUT, "probe.jsonl"), "a") as f:
        f.write(line + "\n")


def bench(fn, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=20, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cudnn_varlen(q, k, v, cu, max_s, scale=None):
    """q [T, Hq, D], k/v [T, Hk, D], cu int32 [n+1]. Positional args common to torch 2.11 and 2.14."""
    res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_s, max_s, True, 0.0, True, False,
                                                  scale=scale)
    return res[0], res[1]


def flash_varlen(q, k, v, cu, max_s):
    res = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_s, max_s, 0.0, True, False)
    return res[0], res[1]


def pack(q, k, v, full_kv, G):
    """Dense BSHD q [1,S,Hq,D], k/v [1,S,Hkv,D] -> THD packs with one sequence per full kv head:
    qp [n_slots*S, G, D], kp/vp [n_slots*S, 1, D]; trailing slots left as garbage (never read)."""
    _, S, Hq, D = q.shape
    Hkv = k.shape[2]
    qp = torch.empty(Hkv * S, G, D, device=dev, dtype=q.dtype).normal_()
    kp = torch.empty(Hkv * S, 1, D, device=dev, dtype=q.dtype).normal_()
    vp = torch.empty(Hkv * S, 1, D, device=dev, dtype=q.dtype).normal_()
    for slot, h in enumerate(full_kv):
        qp[slot * S:(slot + 1) * S] = q[0, :, h * G:(h + 1) * G]
        kp[slot * S:(slot + 1) * S, 0] = k[0, :, h]
        vp[slot * S:(slot + 1) * S, 0] = v[0, :, h]
    cu = torch.tensor([min(i, len(full_kv)) * S for i in range(Hkv + 1)], dtype=torch.int32, device=dev)
    return qp, kp, vp, cu


def dense_ref(q, k, v, full_kv, G):
    """Per-head dense causal SDPA (math backend in fp32) for the full kv heads: out [S, n*G, D], lse."""
    outs, lses = [], []
    for h in full_kv:
        qq = q[0, :, h * G:(h + 1) * G].transpose(0, 1).float()  # [G,S,D]
        kk = k[0, :, h].float()
        vv = v[0, :, h].float()
        s = qq @ kk.T / math.sqrt(q.shape[-1])
        S = s.shape[-1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        lses.append(torch.logsumexp(s, -1))  # [G,S]
        outs.append(torch.softmax(s, -1) @ vv)  # [G,S,D]
    return torch.cat(outs, 0), torch.cat(lses, 0)


def correctness(S, Hq, Hkv, D, n_full):
    G = Hq // Hkv
    q = torch.randn(1, S, Hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    full_kv = sorted(torch.randperm(Hkv)[:n_full].tolist())  # scattered full heads, packed in order
    qp, kp, vp, cu = pack(q, k, v, full_kv, G)
    ref_o, ref_l = dense_ref(q, k, v, full_kv, G)
    for name, fn, kvexp in [("cudnn_gqa", cudnn_varlen, False), ("cudnn_expanded_kv", cudnn_varlen, True),
                            ("flash2_gqa", flash_varlen, False)]:
        try:
            kk = kp.expand(-1, G, -1).contiguous() if kvexp else kp
            vv = vp.expand(-1, G, -1).contiguous() if kvexp else vp
            o, l = fn(qp, kk, vv, cu, S)
            torch.cuda.synchronize()
            n = len(full_kv) * S
            o_used = o[:n].view(len(full_kv), S, G, D).permute(0, 2, 1, 3).reshape(-1, S, D)
            # lse layout discovery: try [Hq, T], [T, Hq], [T, Hq, 1]
            lay, lerr = "unknown", None
            if l.dim() == 2 and l.shape[0] == G:
                lu = l[:, :n].view(G, len(full_kv), S).transpose(0, 1).reshape(-1, S)
                lay, lerr = "[Hq, T]", rel(lu, ref_l)
            elif l.dim() >= 2 and l.shape[0] == qp.shape[0]:
                lu = l.reshape(qp.shape[0], G)[:n].view(len(full_kv), S, G).permute(0, 2, 1).reshape(-1, S)
                lay, lerr = "[T, Hq(,1)]", rel(lu, ref_l)
            rec(probe="varlen_correctness", impl=name, S=S, Hq=Hq, Hkv=Hkv, D=D, n_full=len(full_kv),
                out_shape=list(o.shape), out_stride=list(o.stride()), lse_shape=list(l.shape),
                lse_stride=list(l.stride()), lse_layout=lay, out_rel_err=rel(o_used, ref_o), lse_rel_err=lerr,
                out_finite=bool(torch.isfinite(o_used).all()))
        except Exception as e:
            rec(probe="varlen_correctness", impl=name, S=S, Hq=Hq, Hkv=Hkv, D=D, n_full=len(full_kv),
                error=repr(e)[:400])


def speed(S, Hq=32, Hkv=8, D=128):
    G = Hq // Hkv
    q = torch.randn(1, S, Hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fl = 4 * S * S / 2 * D * Hq
    dense = {}
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            def f():
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            dense[name] = bench(f)
            rec(probe="dense_sdpa", backend=name, S=S, ms=dense[name], tflops=fl / dense[name] / 1e9)
        except Exception as e:
            rec(probe="dense_sdpa", backend=name, S=S, error=repr(e)[:300])
    for n_full in (2, 4, 8):
        full_kv = list(range(n_full))
        qp, kp, vp, cu = pack(q, k, v, full_kv, G)
        for name, fn, kvexp in [("cudnn_gqa", cudnn_varlen, False), ("cudnn_expanded_kv", cudnn_varlen, True),
                                ("flash2_gqa", flash_varlen, False)]:
            try:
                kk = kp.expand(-1, G, -1).contiguous() if kvexp else kp
                vv = vp.expand(-1, G, -1).contiguous() if kvexp else vp
                t = bench(lambda: fn(qp, kk, vv, cu, S))
                ideal = dense.get("cudnn", float("nan")) * n_full / Hkv
                rec(probe="varlen_speed", impl=name, S=S, n_full=n_full, of=Hkv, ms=t,
                    tflops=fl * n_full / Hkv / t / 1e9, dense_cudnn_scaled_ms=ideal)
            except Exception as e:
                rec(probe="varlen_speed", impl=name, S=S, n_full=n_full, error=repr(e)[:300])
        # the gather cost in torch (our kernel should do no worse): index_select of q/k/v for the full heads
        idx = torch.tensor(full_kv, device=dev)
        qidx = (idx[:, None] * G + torch.arange(G, device=dev)).flatten()

        def gather():
            a = q.index_select(2, qidx)
            b = k.index_select(2, idx)
            c = v.index_select(2, idx)
            return a, b, c
        rec(probe="torch_gather", S=S, n_full=n_full, ms=bench(gather))
    # trailing zero-length only: no full heads at all
    try:
        qp, kp, vp, cu = pack(q, k, v, [], G)
        o, l = cudnn_varlen(qp, kp, vp, cu, S)
        torch.cuda.synchronize()
        rec(probe="varlen_all_empty", impl="cudnn_gqa", ok=True, ms=bench(lambda: cudnn_varlen(qp, kp, vp, cu, S)))
    except Exception as e:
        rec(probe="varlen_all_empty", impl="cudnn_gqa", error=repr(e)[:300])


def stream_block_mask(S, modes_q, sink, win, blk):
    """Analytic BlockMask for token-exact streaming (j < sink or i - j < win, j <= i) or causal per head."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = S // blk
    H = modes_q.numel()
    qb = torch.arange(nb, device=dev)[:, None]
    kb = torch.arange(nb, device=dev)[None, :]
    q_lo, q_hi = qb * blk, qb * blk + blk - 1
    k_lo, k_hi = kb * blk, kb * blk + blk - 1
    all_causal, any_causal = k_hi <= q_lo, k_lo <= q_hi
    all_stream = (k_hi < sink) | (q_hi - k_lo < win)
    any_stream = (k_lo < sink) | ((q_lo - k_hi).clamp_min(0) < win)
    is_s = modes_q.view(H, 1, 1).bool()
    full = torch.where(is_s, (all_causal & all_stream)[None], all_causal[None])
    anyv = torch.where(is_s, (any_causal & any_stream)[None], any_causal[None])
    part = anyv & ~full

    def to_idx(m):
        cnt = m.sum(-1).to(torch.int32)[None]
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]
        return cnt, idx

    fc, fi = to_idx(full)
    pc, pi = to_idx(part)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (modes_q[h] == 0) | (kv_idx < sink) | (q_idx - kv_idx < win)
        return (q_idx >= kv_idx) & ok

    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=blk, mask_mod=mask_mod, seq_lengths=(S, S))


def flex_probe(S_small=1024, S_big=32768):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    Hq, Hkv, D, G = 32, 8, 128, 4
    sink, win, blk = 128, 512, 128
    try:
        modes_kv = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.int32, device=dev)
        modes_q = modes_kv.repeat_interleave(G)
        q = torch.randn(1, Hq, S_small, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, S_small, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, S_small, D, device=dev, dtype=torch.bfloat16)
        t = time.time()
        bm = stream_block_mask(S_small, modes_q, sink, win, blk)
        o = flex(q, k, v, block_mask=bm, enable_gqa=True)
        torch.cuda.synchronize()
        compile_s = time.time() - t
        i = torch.arange(S_small, device=dev)[:, None]
        j = torch.arange(S_small, device=dev)[None, :]
        vis_s = (j <= i) & ((j < sink) | (i - j < win))
        vis_f = j <= i
        vis = torch.where(modes_q.view(Hq, 1, 1).bool(), vis_s[None], vis_f[None])
        kk, vv = k.repeat_interleave(G, 1).float(), v.repeat_interleave(G, 1).float()
        s = (q.float() @ kk.transpose(-1, -2)) / math.sqrt(D)
        ref = torch.softmax(s.masked_fill(~vis[None], float("-inf")), -1) @ vv
        rec(probe="flex_token_stream", S=S_small, compile_s=compile_s, rel_err=rel(o, ref))
    except Exception as e:
        rec(probe="flex_token_stream", S=S_small, error=repr(e)[:400], tb=traceback.format_exc()[-600:])
        return
    try:
        win = 2048
        modes_q = torch.tensor([0, 1] * 4, dtype=torch.int32, device=dev).repeat_interleave(G)
        q = torch.randn(1, Hq, S_big, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, S_big, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, S_big, D, device=dev, dtype=torch.bfloat16)
        t = time.time()
        bm = stream_block_mask(S_big, modes_q, sink, win, blk)
        torch.cuda.synchronize()
        mask_s = time.time() - t
        flex(q, k, v, block_mask=bm, enable_gqa=True)
        torch.cuda.synchronize()
        rec(probe="flex_token_stream_speed", S=S_big, msr=0.5, mask_build_s=mask_s,
            ms=bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)))
    except Exception as e:
        rec(probe="flex_token_stream_speed", S=S_big, error=repr(e)[:400])


def main():
    rec(probe="env", torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        gpu=torch.cuda.get_device_name(), triton=__import__("triton").__version__)
    for n in ("_cudnn_attention_forward", "_flash_attention_forward", "_scaled_dot_product_cudnn_attention"):
        op = getattr(torch.ops.aten, n)
        rec(probe="schema", op=n, schemas=[str(getattr(op, o)._schema) for o in op.overloads()])
    torch.manual_seed(0)
    correctness(1024, 32, 8, 128, 3)   # Llama-like, 3 of 8 slots full, 5 trailing empty
    correctness(768, 9, 3, 64, 2)      # SmolLM2-like, GQA 3, D 64, S not a multiple of 128? (768 is)
    correctness(1000, 9, 3, 64, 1)     # ragged length (not a tile multiple)
    speed(int(os.environ.get("PROBE_S", "32768")))
    if time.time() - T0 < 120:
        flex_probe()
    else:
        rec(probe="flex_token_stream", skipped="time budget")
    print("=== SUMMARY ===")
    for f in findings:
        if f["probe"] in ("schema", "env"):
            continue
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()
               if k not in ("out_stride", "lse_stride", "tb")})


if __name__ == "__main__":
    main()
