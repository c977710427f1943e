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
        path = "fma" if self.Sq > 1 or "decode_mma=0" in elastic_cuda.ops.reload_kernel_options() else "mma"
        tag = f"{path} {self.dtype} D{self.D}"
        MAX_ERR[f"out {tag}"] = max(MAX_ERR.get(f"out {tag}", 0.0), err)
        MAX_ERR[f"lse {tag}"] = max(MAX_ERR.get(f"lse {tag}", 0.0), lerr)
        assert err < OUT_TOL[self.dtype], f"{key}: out max rel err {err:.3e}"
        assert lerr < LSE_ATOL, f"{key}: lse max abs err {lerr:.3e}"
        return out, lse


@pytest.fixture(params=["mma", "fma"])
def decode_path(request, monkeypatch):
    """Steps of one query run the tensor-core kernel (csrc/decode/decode_mma_kernel.cuh) unless ELASTIC_DECODE_MMA=0
    selects the FMA kernel, which steps of several queries always run: tests of Sq 1 take both."""
    monkeypatch.setenv("ELASTIC_DECODE_MMA", "1" if request.param == "mma" else "0")
    assert f"decode_mma={int(request.param == 'mma')}" in elastic_cuda.ops.reload_kernel_options()
    yield request.param
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for key, err in sorted(MAX_ERR.items()):
        print(f"decode max err {key}: {err:.3e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("Sq", [1, 2, 5, 16])
def test_decode_matches_float64_reference(gen, dtype, D, group, Sq, decode_path):
    """Mixed modes per pair, odd lengths, lengths at 1..3 over Sq, split and tile edges, ring wrap-around."""
    lengths = [Sq, Sq + 2, 255, 256, 257, 1031, 4099][: 3 + (Sq % 4)]
    lengths = [max(n, Sq) for n in lengths]
    case = Case(gen, B=len(lengths), Hkv=3, group=group, Sq=Sq, D=D, dtype=dtype, lengths=lengths, sink=5, window=61)
    case.check(f"G{group} Sq{Sq}")


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 999])
def test_forced_splits_agree(gen, num_splits, decode_path):
    lengths = [1, 300, 2049, 5000]
    case = Case(gen, B=4, Hkv=2, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=lengths, sink=4, window=512)
    out, _ = case.check(f"splits {num_splits}", num_splits=num_splits)
    auto, _ = case.check("auto")
    assert ((out.double() - auto.double()).abs().max() / auto.double().abs().max()).item() < 2e-2


@pytest.mark.parametrize("one_wave", ["1", "0"])
@pytest.mark.parametrize("Sq", [1, 3])
def test_one_wave_plan(gen, one_wave, Sq, decode_path, monkeypatch):
    """The work plan's second pass (ELASTIC_DECODE_ONE_WAVE, default 1; plan_item in decode_kernel.cuh): 64 pairs
    of ~4K keys at targets where chunk = total / target gives more items than the target (5 per pair at 264) and the
    plan re-cuts with total / (target - pairs), spreading each pair's keys evenly over its items; both plans against
    float64, mixed modes (ring wrap), several queries (the FMA kernel's causal edges inside items). decode_path's
    teardown undoes the shared monkeypatch (this variable too) and reloads the options."""
    monkeypatch.setenv("ELASTIC_DECODE_ONE_WAVE", one_wave)
    assert f"decode_one_wave={one_wave}" in elastic_cuda.ops.reload_kernel_options()
    lengths = [4099, 4096, 4000, 4131, 3001, 4099, 4097, 4099]
    case = Case(gen, B=8, Hkv=8, group=4, Sq=Sq, D=128, dtype=torch.bfloat16, lengths=lengths, sink=7, window=1500)
    outs = [case.check(f"one_wave={one_wave} target {t}", num_splits=t)[0] for t in (264, 200, 128, 0)]
    for o in outs[1:]:
        assert ((o.double() - outs[0].double()).abs().max() / outs[0].double().abs().max()).item() < 2e-2


def test_many_pairs_and_items(gen, decode_path):
    """320 pairs (the device-side work plan walks several pairs per thread) of very different lengths, with the
    automatic item target and with forced ones (one chunk per pair; many small chunks: items >> pairs)."""
    lengths = [1 + (37 * b * b) % 3000 for b in range(40)]
    case = Case(gen, B=40, Hkv=8, group=1, Sq=1, D=64, dtype=torch.bfloat16, lengths=lengths, sink=3, window=100)
    for target in (0, 1, 5000):
        case.check(f"many pairs target {target}", num_splits=target)


def test_stream_heavy_batch_one(gen, decode_path):
    """Batch 1, 6 of 8 heads STREAM (the issue's routing) at a length where FULL pairs take almost every item."""
    modes = torch.tensor([[STREAM, FULL, STREAM, STREAM, FULL, STREAM, STREAM, STREAM]], dtype=torch.int32)
    case = Case(gen, B=1, Hkv=8, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=[40000], sink=128,
                window=2048, modes=modes)
    case.check("stream heavy")


def _finite_copy(t):
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Sq", [1, 2])
def test_nonfinite_rule(gen, dtype, Sq, decode_path):
    """README "Non-finite inputs": a row is NaN iff its q row or a K/V row it can see is non-finite; rows that
    cannot see a poisoned key equal the reference computed with that key made finite. Sq 1 runs the tensor-core
    kernel (unless decode_path is fma), Sq 2 the FMA kernel, where a key can be visible to one query and not the
    other."""
    group, sink, window = 2, 3, 16
    modes = torch.tensor([[FULL, STREAM], [STREAM, FULL], [FULL, FULL]], dtype=torch.int32)
    lengths = [300, 301, 50]
    case = Case(gen, B=3, Hkv=2, group=group, Sq=Sq, D=128, dtype=dtype, lengths=lengths, sink=sink,
                window=window, modes=modes)
    ring = case.stream_k.shape[1] - sink
    row = lambda pos: pos if pos < sink else sink + (pos - sink) % ring  # noqa: E731
    expect_nan = torch.zeros(3, Sq, 2 * group, dtype=torch.bool)

    def poisons(b, h, pos):
        """Rows of pair (b, h) that see position pos become NaN."""
        n = lengths[b]
        for qi in range(Sq):
            i = n - Sq + qi
            if pos <= i and (modes[b, h] != STREAM or pos < sink or i - pos < window):
                expect_nan[b, qi, h * group:(h + 1) * group] = True

    # (0, FULL): V of the newest key = inf (with Sq 2 only the newest query sees it).
    case.full_v[case.slot[0, 0], 299] = float("inf")
    poisons(0, 0, 299)
    # (0, STREAM): K of rlo = n - Sq - window + 1, the oldest recent key (with Sq 2 only query 0 sees it).
    rlo = 300 - Sq - window + 1
    case.stream_k[case.slot[0, 1], row(rlo)] = float("nan")
    poisons(0, 1, rlo)
    # Rows no pair may read: an unused STREAM pool row, and the whole-history rows past sample 2's length.
    unused = sorted(set(range(case.stream_k.shape[0])) - set(case.slot[modes == STREAM].tolist()))
    case.stream_k[unused[0]] = float("nan")
    case.stream_v[unused[0]] = float("inf")
    case.full_k[case.slot[2, 0], 50:] = float("inf")
    case.full_v[case.slot[2, 0], 50:] = float("nan")
    # (2, FULL head 1): K of position 49 = -inf; q of sample 2, its last query, head 0 = NaN.
    case.full_k[case.slot[2, 1], 49] = float("-inf")
    poisons(2, 1, 49)
    case.q[2, Sq - 1, 0, 5] = float("nan")
    expect_nan[2, Sq - 1, 0] = True
    assert expect_nan.any() and not expect_nan.all()
    args = case.tensors(DEV)
    _poison_allocator(args[0])
    out, lse = decode_attention(*args, sink=sink, window=window, return_lse=True)
    clean = [_finite_copy(t) for t in case.tensors("cpu", torch.float64)[:5]] + case.tensors("cpu")[5:]
    ref, ref_lse = decode_attention_cpu(*clean, sink=sink, window=window)
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(torch.isnan(out).all(-1), expect_nan), "NaN rows differ from the rule"
    assert not (torch.isnan(out).any(-1) & ~expect_nan).any(), "partly NaN row"
    assert torch.equal(torch.isnan(lse), expect_nan.permute(0, 2, 1)), "NaN lse differ from the rule"
    ok = ~expect_nan
    err = ((out.double() - ref)[ok].abs().max() / ref[ok].abs().max()).item()
    assert err < OUT_TOL[dtype], f"finite rows: max rel err {err:.3e}"
    assert torch.isfinite(out[ok]).all()


def test_all_full_and_all_stream_long(gen, decode_path):
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


def test_graph_capture_replays_with_new_lengths(gen, decode_path):
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


def _tiny_llama_sharp(dtype, seed):
    """_tiny_llama with larger q/k weights (random init gives near-uniform attention; the masks must matter)."""
    model = _tiny_llama(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def test_generate_per_sample_routing_left_padding_matches_prefill_reference():
    """The issue's correctness target on the GPU: 64 greedy tokens in bf16 with per-sample routing (router policy,
    per-request sparsity shift) and left padding over ElasticStaticCache (decode kernel); every step's logits equal
    the prefill-only elastic reference (the whole sequence through the masked eager reference with the prompt's
    routing, in fp32) within bf16 tolerance."""
    pytest.importorskip("transformers")
    import copy

    from test_transformers import decisive, reference_logits

    from elastic_cuda.integrations.static_cache import ElasticStaticCache
    from elastic_cuda.integrations.transformers import disable, enable
    from elastic_cuda.router import RouterSet

    sink, window = 4, 24
    model = _tiny_llama_sharp(torch.bfloat16, seed=3)
    routers = decisive(RouterSet.for_model(model).double(), seed=2).to(DEV)
    lengths = [120, 67, 95]
    S, new = max(lengths), 64
    g = torch.Generator().manual_seed(5)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = torch.randint(3, 256, (n,), generator=g)
        mask[b, S - n:] = 1
    ids, mask = ids.to(DEV), mask.to(DEV)
    state = enable(model, routers, policy="router", sink=sink, window=window,
                   sparsity_shift=torch.tensor([3.0, -3.0, 0.0], device=DEV))
    cache = ElasticStaticCache(model, max_batch_size=3, max_cache_len=S + new + 1)
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             disable_compile=True)
    modes = state.last_head_mode.clone()  # [B, L, Hkv]
    # Per-sample routing: the shifts +3 / -3 push samples 0 and 1 to opposite routings.
    assert len({tuple(m.flatten().tolist()) for m in modes}) >= 2, modes
    assert (modes == STREAM).any() and (modes == FULL).any()
    disable(model)
    ref_model = copy.deepcopy(model).float()
    worst = 0.0
    for b, n in enumerate(lengths):
        seq = gen.sequences[b:b + 1, S - n:]
        ref = reference_logits(ref_model, seq[:, :-1], modes[b:b + 1], sink=sink, window=window)
        for step in range(new):
            a, r = gen.logits[step][b].float(), ref[0, n - 1 + step].float()
            err = ((a - r).abs().max() / r.abs().max()).item()
            worst = max(worst, err)
            assert err < 3e-2, (b, step, err)
    print(f"generate bf16 vs fp32 prefill reference: worst step rel err {worst:.3e}")
    assert cache.memory_bytes() < 0.9 * cache.dense_memory_bytes()


@pytest.mark.parametrize("side", ["dense", "elastic", "all_full"])
def test_graphed_greedy_generate_matches_eager(side):
    """graphed_greedy_generate (hand-captured decode step, benchmarks' generate rows) gives the logits of the same
    model decoding eagerly step by step, for transformers' StaticCache (dense), ElasticStaticCache and
    ElasticStaticCache with every head FULL (bench_decode's dense_ours side)."""
    pytest.importorskip("transformers")
    from transformers import StaticCache

    from elastic_cuda.integrations.generate import graphed_greedy_generate
    from elastic_cuda.integrations.static_cache import ElasticStaticCache
    from elastic_cuda.integrations.transformers import enable

    model = _tiny_llama_sharp(torch.bfloat16, seed=4)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 256, (2, 150), device=DEV, generator=torch.Generator(DEV).manual_seed(6))
    new = 24

    def make_cache():
        if side == "dense":
            return StaticCache(config=model.config, max_cache_len=ids.shape[1] + new + 1)
        return ElasticStaticCache(model, max_batch_size=2, max_cache_len=ids.shape[1] + new + 1)

    if side == "elastic":
        enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=4, window=32)
    elif side == "all_full":
        enable(model, policy="all_full", sink=4, window=32)
    run = graphed_greedy_generate(model, ids, make_cache(), new, keep_logits=True)
    assert run.replayed_steps == new - 3 and run.decode_tokens_per_s() > 0
    # Eager reference: the same steps without a graph, on a fresh cache, fed the graphed run's tokens.
    cache = make_cache()
    with torch.no_grad():
        pos = torch.arange(ids.shape[1], device=DEV)
        out = model(input_ids=ids, position_ids=pos[None].expand(2, -1), cache_position=pos, past_key_values=cache,
                    logits_to_keep=1)
        want = [out.logits[:, -1].float()]
        L = cache.layers[0].max_cache_len
        for i in range(1, new):
            n = ids.shape[1] + i  # tokens after this step
            cur = torch.tensor([n - 1], device=DEV)
            mask = None
            if side == "dense":  # the explicit mask transformers' SDPA needs over a static cache (see generate.py)
                mask = torch.zeros(2, L, dtype=torch.long, device=DEV)
                mask[:, :n] = 1
            out = model(input_ids=run.tokens[:, i - 1:i], position_ids=cur.view(1, 1).expand(2, 1),
                        cache_position=cur, attention_mask=mask, past_key_values=cache)
            want.append(out.logits[:, -1].float())
    for i in range(new):
        err = ((run.logits[i] - want[i]).abs().max() / want[i].abs().max()).item()
        assert err < 1e-2, (i, err)
    assert torch.equal(run.tokens[:, 0], want[0].argmax(-1))


def test_graphed_generate_over_a_reset_cache_equals_a_fresh_one():
    """A serving lifetime on the GPU: one ElasticStaticCache, reset() between two graphed generations of different
    prompts (the second commit writes into the pools and tables the first allocated, its decode graph captured anew)
    gives the second prompt exactly what a fresh cache gives it."""
    pytest.importorskip("transformers")
    from elastic_cuda.integrations.generate import graphed_greedy_generate
    from elastic_cuda.integrations.static_cache import ElasticStaticCache
    from elastic_cuda.integrations.transformers import enable

    model = _tiny_llama_sharp(torch.bfloat16, seed=5)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=4, window=32)
    gen = torch.Generator(DEV).manual_seed(8)
    first, second = (torch.randint(3, 256, (2, n), device=DEV, generator=gen) for n in (170, 130))
    new = 12
    shared = ElasticStaticCache(model, max_batch_size=2, max_cache_len=200)
    graphed_greedy_generate(model, first, shared, new)
    addresses = [layer.full.k_store.data_ptr() for layer in shared.layers]
    shared.reset()
    reused = graphed_greedy_generate(model, second, shared, new, keep_logits=True)
    assert [layer.full.k_store.data_ptr() for layer in shared.layers] == addresses  # (same routing: pools kept)
    fresh = graphed_greedy_generate(model, second, ElasticStaticCache(model, max_batch_size=2, max_cache_len=200), new,
                                    keep_logits=True)
    assert torch.equal(reused.tokens, fresh.tokens)
    err = ((reused.logits - fresh.logits).abs().max() / fresh.logits.abs().max()).item()
    assert err < 1e-3, err


def test_graphed_greedy_generate_dense_nomask_runs():
    """dense_mask=False (bench_decode's dense_nomask timing row): the step captures and replays with SDPA's
    mask-free GQA path over the static cache; its first token is the prefill's (the decode steps attend the empty
    slots too, so only the shapes and finiteness of the later ones are checked)."""
    pytest.importorskip("transformers")
    from transformers import StaticCache

    from elastic_cuda.integrations.generate import graphed_greedy_generate

    model = _tiny_llama_sharp(torch.bfloat16, seed=4)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 256, (2, 150), device=DEV, generator=torch.Generator(DEV).manual_seed(6))
    new = 8
    masked = graphed_greedy_generate(model, ids, StaticCache(config=model.config, max_cache_len=150 + new + 1), new,
                                     keep_logits=True)
    bare = graphed_greedy_generate(model, ids, StaticCache(config=model.config, max_cache_len=150 + new + 1), new,
                                   keep_logits=True, dense_mask=False)
    assert bare.replayed_steps == new - 3 and bool(torch.isfinite(bare.logits).all())
    assert torch.equal(bare.tokens[:, 0], masked.tokens[:, 0])
    with pytest.raises(ValueError, match="dense_mask"):
        graphed_greedy_generate(model, ids, StaticCache(config=model.config, max_cache_len=160), new, dense_mask=1)


def test_static_cache_prefill_commits_without_host_syncs():
    """An unpadded prefill into an ElasticStaticCache pipelines its commits (ElasticStaticCache.stage_commit): no
    stream sync per layer (main's commit_prefill made ~14 per layer: head_mode.cpu() and blocking .to(cuda)
    copies, the demo's 53 vs 22 ms at 8K). Only once-per-forward checks may sync. Then the
    decode continues from the committed pools: the next step's logits equal those of the per-layer commit (the
    same cache filled by commit_prefill, layer by layer, as before) and of the dynamic elastic cache."""
    import warnings

    pytest.importorskip("transformers")
    from elastic_cuda.integrations import static_cache as sc
    from elastic_cuda.integrations.transformers import enable

    model = _tiny_llama(torch.bfloat16)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=4, window=32)
    ids = torch.randint(3, 256, (1, 300), device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    with torch.no_grad():
        model(ids, past_key_values=sc.ElasticStaticCache(model, max_batch_size=1, max_cache_len=340), use_cache=True)
        cache = sc.ElasticStaticCache(model, max_batch_size=1, max_cache_len=340)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = model(ids, past_key_values=cache, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (the first warning of the mode is its own notice, "Synchronization debug mode is a prototype feature")
        syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
        # <= 2: the packed-position check, and room for one of transformers' own; a sync per layer would give >= 3
        # here (2 layers), main's commit ~28
        assert len(syncs) <= 2, syncs
        assert all(layer.prefilled and layer._staged is None for layer in cache.layers)
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(nxt, past_key_values=cache, use_cache=True).logits.float()
        # the same prefill committed per layer at once (stage + finish in the attention call, as main did)
        eager = sc.ElasticStaticCache(model, max_batch_size=1, max_cache_len=340)
        original = sc.ElasticStaticCache.stage_commit
        sc.ElasticStaticCache.stage_commit = lambda self, layer, *a, **k: layer.commit_prefill(*a, **k)
        try:
            model(ids, past_key_values=eager, use_cache=True)
        finally:
            sc.ElasticStaticCache.stage_commit = original
        ref = model(nxt, past_key_values=eager, use_cache=True).logits.float()
        dense = model(ids, use_cache=True)
        ref_dyn = model(nxt, past_key_values=dense.past_key_values, use_cache=True).logits.float()
    assert torch.equal(step, ref)
    err = ((step - ref_dyn).abs().max() / ref_dyn.abs().max()).item()
    print(f"static (pipelined) vs dynamic elastic cache, next-step logits rel err {err:.2e}")
    assert err < 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H", [1, 3, 8])
@pytest.mark.parametrize("lengths,sink,ring", [([1], 4, 8), ([3, 2, 1], 4, 8), ([64, 64], 128, 2048),
                                               ([65, 17, 64], 8, 16), ([300, 129, 1, 300], 128, 40),
                                               ([777], 0, 100)])
def test_static_cache_commit_matches_cpu_kernel(gen, dtype, D, H, lengths, sink, ring):
    """elastic::static_cache_commit on CUDA against its CPU kernel on the same inputs: pools, slots and lengths
    bit-equal (a commit copies), with NaN-poisoned pools (rows it must not touch stay NaN, rows it forgot fail);
    transformers' strided [B, H, S, D] keys, left padding, S < sink, S < ring, tile edges (64 tokens a CTA), rings
    that wrap, per-sample routing, GQA-agnostic head counts 1/3/8."""
    from conftest import static_commit_case

    from elastic_cuda.ops import static_cache_commit

    args, kw = static_commit_case(len(lengths), H, max(lengths), D, lengths, gen, sink=sink, ring=ring, dtype=dtype)
    gpu = [None if a is None else a.to(DEV) for a in args]
    static_cache_commit(*args, **kw)
    static_cache_commit(*gpu, **kw)
    torch.cuda.synchronize()
    names = ["full_k", "full_v", "stream_k", "stream_v", "mode_table", "slot", "is_whole", "seq_lens"]
    for name, want, got in zip(names, args[5:13], gpu[5:13], strict=True):
        got = got.cpu()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), name


def test_static_cache_commit_odd_alignment(gen):
    """Keys whose rows start at an odd element offset (a 2-byte word copy instead of 16-byte ones) and fp32 (CUDA
    decode does not take it, the commit does any dtype)."""
    from conftest import static_commit_case

    from elastic_cuda.ops import static_cache_commit

    for dtype, cut in ((torch.bfloat16, 1), (torch.float32, 0)):
        args, kw = static_commit_case(2, 3, 70, 64, [70, 33], gen, sink=4, ring=20, dtype=dtype)
        if cut:  # keys and values as views one element into a wider buffer
            k = torch.zeros(2, 70, 3, 64 + cut, dtype=dtype)
            k[..., cut:] = args[0].transpose(1, 2)
            args[0] = k[..., cut:].transpose(1, 2)
            v = torch.zeros_like(k)
            v[..., cut:] = args[1].transpose(1, 2)
            args[1] = v[..., cut:].transpose(1, 2)
        gpu = [None if a is None else a.to(DEV) for a in args]
        if cut:  # .to() keeps strides but not the offset: rebuild the views on the device
            gpu[0] = k.to(DEV)[..., cut:].transpose(1, 2)
            gpu[1] = v.to(DEV)[..., cut:].transpose(1, 2)
        static_cache_commit(*args, **kw)
        static_cache_commit(*gpu, **kw)
        for want, got in zip(args[5:13], gpu[5:13], strict=True):
            got = got.cpu()
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
