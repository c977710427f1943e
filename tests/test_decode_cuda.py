"""CUDA decode attention (elastic::decode_attention, csrc/decode/) against the float64 CPU reference, and the static
elastic cache on the GPU. Skips cleanly without a CUDA device or CUDA kernels.

Every case draws fresh random pools, slots (a random permutation of pool rows), per-pair modes and per-sample lengths,
runs the kernel in fp16/bf16 and elastic_cuda._decode_cpu (the op's CPU kernel) in float64 on the same rounded inputs,
and reports max |diff| / max |ref|. Outputs are poisoned: the caching allocator hands the op a block just filled with
NaN, so an element the kernel forgot to write fails the finiteness check.
Run: pytest -s -m gpu tests/test_decode_cuda.py
"""
from __future__ import annotations

import pytest
import torch

import elastic_cuda
from elastic_cuda import BLOCK, FULL, STREAM
from elastic_cuda._decode_cpu import decode_attention_cpu
from elastic_cuda.ops import decode_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not elastic_cuda.has_cuda_kernels(), reason="extension built without CUDA kernels"),
]

DEV = "cuda"
OUT_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to max |ref|; the kernel rounds O to 16 bits
LSE_ATOL = 1e-3
MAX_ERR: dict[str, float] = {}


def _poison_allocator(q):
    """Leave freed blocks of NaN of the outputs' sizes in the caching allocator (best fit hands them to the op's
    out [B, Sq, Hq, D] and lse [B, Hq, Sq] allocations next), so an element the kernel never writes stays NaN."""
    B, Sq, Hq, _ = q.shape
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32, device=DEV)
    del out, lse


class Case:
    """Random pools and tables for one decode step. lengths: int per sample; modes: int32 [B, Hkv] or None."""

    def __init__(self, gen, *, B, Hkv, group, Sq, D, dtype, lengths, sink, window, modes=None, max_len=None,
                 spare_rows=3):
        self.B, self.Hkv, self.group, self.Sq, self.D, self.dtype = B, Hkv, group, Sq, D, dtype
        self.sink, self.window = sink, window
        if modes is None:
            modes = torch.tensor([FULL, STREAM, BLOCK], dtype=torch.int32)[torch.randint(3, (B, Hkv), generator=gen)]
        self.modes = modes
        whole = modes != STREAM
        n_whole, n_stream = int(whole.sum()), int((~whole).sum())
        L = max_len or max(lengths)
        ring_tokens = sink + window + Sq - 1
        # Spare rows and a random permutation: slots are not the identity, unused rows hold garbage.
        Pf, Ps = n_whole + spare_rows, n_stream + spare_rows
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
        self.full_k, self.full_v = rnd(Pf, L, D), rnd(Pf, L, D)
        self.stream_k, self.stream_v = rnd(Ps, ring_tokens, D), rnd(Ps, ring_tokens, D)
        perm_w, perm_s = torch.randperm(Pf, generator=gen)[:n_whole], torch.randperm(Ps, generator=gen)[:n_stream]
        slot = torch.empty(B, Hkv, dtype=torch.int32)
        slot[whole], slot[~whole] = perm_w.to(torch.int32), perm_s.to(torch.int32)
        self.slot = slot
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32)
        self.q = rnd(B, Sq, Hkv * group, D)

    def tensors(self, device, dtype=None):
        cast = (lambda t: t.to(device, dtype)) if dtype else (lambda t: t.to(device))
        return [cast(t) for t in (self.q, self.full_k, self.full_v, self.stream_k, self.stream_v)] + \
            [t.to(device) for t in (self.modes, self.slot, self.seq_lens)]

    def run(self, num_splits=0, scale=None):
        args = self.tensors(DEV)
        _poison_allocator(args[0])
        out, lse = decode_attention(*args, sink=self.sink, window=self.window, scale=scale, num_splits=num_splits,
                                    return_lse=True)
        ref_out, ref_lse = decode_attention_cpu(*self.tensors("cpu", torch.float64), sink=self.sink,
                                                window=self.window, scale=scale)
        return out, lse, ref_out, ref_lse

    def check(self, key, **kw):
        out, lse, ref_out, ref_lse = self.run(**kw)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), f"{key}: unwritten or non-finite output"
        err = ((out.double().cpu() - ref_out).abs().max() / ref_out.abs().max()).item()
        lerr = (lse.double().cpu() - ref_lse).abs().max().item()
        tag = f"{self.dtype} D{self.D}"
        MAX_ERR[f"out {tag}"] = max(MAX_ERR.get(f"out {tag}", 0.0), err)
        MAX_ERR[f"lse {tag}"] = max(MAX_ERR.get(f"lse {tag}", 0.0), lerr)
        assert err < OUT_TOL[self.dtype], f"{key}: out max rel err {err:.3e}"
        assert lerr < LSE_ATOL, f"{key}: lse max abs err {lerr:.3e}"
        return out, lse


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for key, err in sorted(MAX_ERR.items()):
        print(f"decode max err {key}: {err:.3e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("Sq", [1, 2, 5, 16])
def test_decode_matches_float64_reference(gen, dtype, D, group, Sq):
    """Mixed modes per pair, odd lengths, lengths at 1..3 over Sq, split and tile edges, ring wrap-around."""
    lengths = [Sq, Sq + 2, 255, 256, 257, 1031, 4099][: 3 + (Sq % 4)]
    lengths = [max(n, Sq) for n in lengths]
    case = Case(gen, B=len(lengths), Hkv=3, group=group, Sq=Sq, D=D, dtype=dtype, lengths=lengths, sink=5, window=61)
    case.check(f"G{group} Sq{Sq}")


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_forced_splits_agree(gen, num_splits):
    lengths = [1, 300, 2049, 5000]
    case = Case(gen, B=4, Hkv=2, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=lengths, sink=4, window=512)
    out, _ = case.check(f"splits {num_splits}", num_splits=num_splits)
    auto, _ = case.check("auto")
    assert ((out.double() - auto.double()).abs().max() / auto.double().abs().max()).item() < 2e-2


def test_all_full_and_all_stream_long(gen):
    for mode in (FULL, STREAM):
        modes = torch.full((2, 8), mode, dtype=torch.int32)
        case = Case(gen, B=2, Hkv=8, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=[32768, 20001],
                    sink=128, window=2048, modes=modes)
        case.check(f"mode {mode}")


def test_scale_and_strided_q(gen):
    case = Case(gen, B=2, Hkv=2, group=2, Sq=3, D=64, dtype=torch.float16, lengths=[40, 77], sink=2, window=9)
    case.check("scale", scale=0.05)
    # transformers hands q as [B, Hq, Sq, D].transpose(1, 2): strided, d contiguous.
    args = case.tensors(DEV)
    q_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    out = decode_attention(q_t, *args[1:], sink=case.sink, window=case.window)
    ref = decode_attention(args[0], *args[1:], sink=case.sink, window=case.window)
    assert torch.equal(out, ref)


def test_out_of_range_values_give_nan_rows(gen):
    case = Case(gen, B=3, Hkv=2, group=2, Sq=1, D=64, dtype=torch.bfloat16, lengths=[10, 10, 10], sink=2, window=4,
                modes=torch.tensor([[FULL, STREAM], [FULL, STREAM], [FULL, FULL]], dtype=torch.int32))
    q, fk, fv, sk, sv, modes, slot, lens = case.tensors(DEV)
    modes[0, 0] = 7              # bad mode
    slot[1, 1] = 10_000          # slot outside the STREAM pool
    lens[2] = fk.shape[1] + 1    # longer than the whole-history pool
    out, lse = decode_attention(q, fk, fv, sk, sv, modes, slot, lens, sink=2, window=4, return_lse=True)
    bad = {(0, 0), (1, 1), (2, 0), (2, 1)}
    for b in range(3):
        for h in range(2):
            rows = out[b, :, h * 2:(h + 1) * 2]
            assert torch.isnan(rows).all() == ((b, h) in bad) and torch.isfinite(rows).all() == ((b, h) not in bad)


def test_graph_capture_replays_with_new_lengths(gen):
    case = Case(gen, B=2, Hkv=2, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=[500, 900], sink=4,
                window=64, max_len=1024)
    args = case.tensors(DEV)
    lens = args[-1]
    decode_attention(*args, sink=4, window=64)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*args, sink=4, window=64)
    lens.copy_(torch.tensor([1000, 37], dtype=torch.int32))
    graph.replay()
    case.seq_lens = lens.cpu()
    ref, _ = decode_attention_cpu(*case.tensors("cpu", torch.float64), sink=4, window=64)
    assert ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item() < OUT_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- static cache on the GPU
def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEV, dtype).eval()


@pytest.mark.parametrize("compiled", [False, True])
def test_static_cache_generate_matches_dynamic_elastic_cache(compiled):
    """bf16 generate with per-layer mixed routing and left padding: the static cache + decode kernel gives the
    logits of the dynamic path (whole history, elastic op) within bf16 tolerance; compiled: transformers' compile
    path (CUDA graphs) over the static cache."""
    pytest.importorskip("transformers")
    from elastic_cuda.integrations.static_cache import ElasticStaticCache
    from elastic_cuda.integrations.transformers import enable

    model = _tiny_llama(torch.bfloat16)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=4, window=32)
    ids = torch.randint(3, 256, (2, 300), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :77] = 0
    kw = dict(attention_mask=mask, max_new_tokens=48, min_new_tokens=48, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(ids, disable_compile=True, **kw)
        cache = ElasticStaticCache(model, max_batch_size=2, max_cache_len=400)
        if compiled:
            from transformers import CompileConfig

            static = model.generate(ids, past_key_values=cache, compile_config=CompileConfig(fullgraph=False), **kw)
        else:
            static = model.generate(ids, past_key_values=cache, disable_compile=True, **kw)
    # Compare while the greedy tokens agree (bf16 rounding may flip a near tie later).
    same = (static.sequences[:, 300:] == dense.sequences[:, 300:]).all(0).long().cumprod(0).sum().item()
    assert same >= 8, f"sequences diverge after {same} tokens"
    for step in range(same):
        a, b = static.logits[step].float(), dense.logits[step].float()
        assert ((a - b).abs().max() / b.abs().max()).item() < 3e-2, step
    assert cache.memory_bytes() < 0.6 * cache.dense_memory_bytes()
