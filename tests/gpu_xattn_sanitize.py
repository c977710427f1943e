"""XAttention estimate op on the GPU: a few ragged shapes (for compute-sanitizer), then timing against the torch path.

  compute-sanitizer --tool memcheck python tests/gpu_xattn_sanitize.py --no-timing
  compute-sanitizer --tool racecheck python tests/gpu_xattn_sanitize.py --no-timing
  ELASTIC_XATTN_SM90_WIDE=0 compute-sanitizer --tool memcheck python tests/gpu_xattn_sanitize.py --no-timing
                                                # the same shapes on kernel 1's narrow wgmma instance
  python tests/gpu_xattn_sanitize.py            # shapes, then timing at 8K / 32K (Llama-3.1-8B attention shape)

The shapes cover dense and packed layouts, GQA 3, D 64 and 128, fp16 and bf16, lengths that are not multiples of
any tile, mixed head modes, several key tiles, blocks of 2 to 32 query groups, and a chunked workspace.
Not a pytest file (tests/test_xattn.py holds the assertions)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from elastic_cuda.attention.xattn import _xattn_block_mask_torch  # noqa: E402
from elastic_cuda.ops import BLOCK, xattn_block_mask  # noqa: E402


def one(modes, lengths, Hq, D, dtype, varlen, bs=128, stride=16, threshold=0.9):
    torch.manual_seed(0)
    B, Hkv = modes.shape
    hm = modes.to(device="cuda", dtype=torch.int32)
    S = max(lengths)
    if varlen:
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
        T = int(cu[-1])
        q = torch.randn(T, Hq, D, device="cuda", dtype=dtype)
        k = torch.randn(T, Hkv, D, device="cuda", dtype=dtype)
        out = xattn_block_mask(q, k, hm, cu_seqlens=cu, max_seqlen=S, block_size=bs, stride=stride,
                               threshold=threshold)
    else:
        q = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype)
        out = xattn_block_mask(q, k, hm, block_size=bs, stride=stride, threshold=threshold)
    torch.cuda.synchronize()
    print("ok", modes.tolist(), lengths, Hq, D, dtype, "varlen" if varlen else "dense", f"bs={bs} s={stride}",
          f"thr={threshold} kept={out.sum().item()}", flush=True)


def torch_rule(q, k):
    return _xattn_block_mask_torch(q, k, block_size=128, stride=16, threshold=0.9, scale=None, cu_seqlens=None,
                                   max_seqlen=None)


def timing():
    from triton.testing import do_bench
    Hq, Hkv, D = 32, 8, 128
    for S in (8192, 32768):
        q = torch.randn(1, S, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        hm = torch.full((1, Hkv), BLOCK, device="cuda", dtype=torch.int32)
        op_ms = do_bench(lambda: xattn_block_mask(q, k, hm), warmup=5, rep=50)
        torch_ms = do_bench(lambda: torch_rule(q, k), warmup=2, rep=20)
        mixed = hm.clone()
        mixed[0, :2] = 0  # 6 of 8 KV heads BLOCK
        mix_ms = do_bench(lambda: xattn_block_mask(q, k, mixed), warmup=5, rep=50)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        qt, kt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
        sdpa_ms = do_bench(lambda: sdpa(qt, kt, kt, is_causal=True), warmup=5, rep=50)
        got, ref = xattn_block_mask(q, k, hm), torch_rule(q, k)
        nb = got.shape[-1]
        causal = nb * (nb + 1) // 2 * Hq
        kept, differ = got.sum().item() / causal, (got != ref).sum().item() / causal
        print(f"S={S}: op {op_ms:.3f} ms (6/8 heads BLOCK: {mix_ms:.3f} ms), torch path {torch_ms:.3f} ms, "
              f"sdpa causal dense {sdpa_ms:.3f} ms; op/dense {op_ms / sdpa_ms:.3f}; kept {kept:.3f} of causal "
              f"blocks; blocks differing from the torch path {differ:.2e}", flush=True)


if __name__ == "__main__":
    one(torch.full((1, 2), BLOCK), [1], 6, 128, torch.bfloat16, varlen=False)
    one(torch.full((1, 2), BLOCK), [2500], 6, 128, torch.bfloat16, varlen=False)
    one(torch.tensor([[BLOCK, 0], [1, BLOCK]]), [300, 300], 6, 64, torch.float16, varlen=False, threshold=0.5)
    one(torch.tensor([[BLOCK, 0], [BLOCK, BLOCK], [1, 1]]), [2200, 0, 77], 6, 128, torch.bfloat16, varlen=True)
    one(torch.full((1, 1), BLOCK), [1000], 4, 64, torch.bfloat16, varlen=False, bs=64, stride=32)  # 2 per block
    one(torch.full((1, 1), BLOCK), [1000], 4, 64, torch.bfloat16, varlen=False, bs=128, stride=4)  # 32 per block
    one(torch.full((1, 1), BLOCK), [1000], 4, 64, torch.bfloat16, varlen=False, threshold=1.0)
    os.environ["ELASTIC_XATTN_WORKSPACE_BYTES"] = "1"  # one query block per chunk
    one(torch.full((2, 2), BLOCK), [1500, 1500], 16, 128, torch.bfloat16, varlen=False)
    del os.environ["ELASTIC_XATTN_WORKSPACE_BYTES"]
    print("sanitize shapes done", flush=True)
    if "--no-timing" not in sys.argv:
        timing()
