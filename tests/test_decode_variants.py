"""The decode kernels' A/B variants (kernel_options.h: ELASTIC_DECODE_COPY=zfill, ELASTIC_DECODE_PDL=0,
ELASTIC_DECODE_MIN_CHUNK=N; csrc/decode/) against the float64 CPU reference, and against the default path (plain
copies, the combine as a programmatic dependent launch, no chunk floor): bit for bit where only how K/V reach shared
memory or how the combine is launched differs (same data, same arithmetic order); within rounding where the chunk
floor changes the work plan (other items, other partial sums).

Cases are built with test_decode_cuda's Case (fresh random pools, non-identity slots, poisoned outputs) at lengths
that give every kind of tile: full tiles, an item's partial last tile (zero-fill copies), STREAM tiles inside the
sink (sink 130 > one 64-key tile), across the sink / ring boundary and across the ring wrap. Several tests of
test_decode_cuda are re-run under each variant (non-finite rule, forced splits, graph replay with new lengths, 320
pairs) on the tensor-core kernel; the switches that also reach the FMA kernel (PDL, chunk floor) are checked there
by test_variant_fma_kernel.
Run: pytest -s -m gpu tests/test_decode_variants.py
"""
from __future__ import annotations

import re

import pytest
import torch

import elastic_cuda
from conftest import cuda_kernel_names
from elastic_cuda import BLOCK, FULL, STREAM
from elastic_cuda.ops import decode_attention
from elastic_cuda._decode_cpu import decode_attention_cpu
from test_decode_cuda import DEV, OUT_TOL, Case, _finite_copy, _poison_allocator
from test_decode_cuda import test_forced_splits_agree as _forced_splits
from test_decode_cuda import test_graph_capture_replays_with_new_lengths as _graph_replay
from test_decode_cuda import test_many_pairs_and_items as _many_pairs
from test_decode_cuda import test_nonfinite_rule as _nonfinite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not elastic_cuda.has_cuda_kernels(), reason="extension built without CUDA kernels"),
]

# variant -> (switches, same arithmetic as the default: outputs equal bit for bit)
VARIANTS = {
    "zfill": ({"ELASTIC_DECODE_COPY": "zfill"}, True),
    "no_pdl": ({"ELASTIC_DECODE_PDL": "0"}, True),
    "min_chunk_512": ({"ELASTIC_DECODE_MIN_CHUNK": "512"}, False),
    "min_chunk_1024_no_pdl": ({"ELASTIC_DECODE_MIN_CHUNK": "1024", "ELASTIC_DECODE_PDL": "0"}, False),
}
SWITCHES = ("ELASTIC_DECODE_MMA", "ELASTIC_DECODE_COPY", "ELASTIC_DECODE_PDL", "ELASTIC_DECODE_MIN_CHUNK",
            "ELASTIC_DECODE_ONE_WAVE")


def _set(monkeypatch, env):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return elastic_cuda.ops.reload_kernel_options()


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    desc = _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", **VARIANTS[request.param][0]})
    assert "decode_mma=1" in desc
    yield request.param
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


def _mixed_case(gen, *, group, D, dtype, B=3, Hkv=3, lengths=(1, 777, 3001), sink=130, window=300):
    modes = torch.tensor([FULL, STREAM, BLOCK], dtype=torch.int32)[torch.randint(3, (B, Hkv), generator=gen)]
    modes[-1, 0], modes[-1, 1] = FULL, STREAM  # the longest sample has both kinds of pair whatever the draw
    return Case(gen, B=B, Hkv=Hkv, group=group, Sq=1, D=D, dtype=dtype, lengths=list(lengths), sink=sink,
                window=window, modes=modes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_variant_matches_float64_reference(gen, variant, dtype, D, group):
    case = _mixed_case(gen, group=group, D=D, dtype=dtype)
    for splits in (0, 1, 7, 999):  # automatic plan; one item per pair (long runs of full tiles); a few; chunk floor
        case.check(f"{variant} {dtype} D{D} G{group} splits {splits}", num_splits=splits)


def _run(case, num_splits):
    args = case.tensors(DEV)
    _poison_allocator(args[0])
    out, lse = decode_attention(*args, sink=case.sink, window=case.window, num_splits=num_splits, return_lse=True)
    torch.cuda.synchronize()
    return out, lse


@pytest.mark.parametrize("num_splits", [0, 3, 999])
def test_variant_equals_default(gen, variant, num_splits, monkeypatch):
    """The variant against the default path on the same inputs (the issue's routing, batch 2, ring wrapped): the copy
    form and the launch of the combine leave the arithmetic alone, so the outputs are equal bit for bit; a chunk floor
    cuts other items (num_splits 0: the automatic chunk of ~90 keys is raised), so within 16-bit rounding."""
    modes = torch.tensor([[STREAM, FULL, STREAM, STREAM, FULL, STREAM, STREAM, STREAM],
                          [FULL, STREAM, STREAM, FULL, STREAM, STREAM, BLOCK, STREAM]], dtype=torch.int32)
    case = Case(gen, B=2, Hkv=8, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=[20001, 9001], sink=128,
                window=2048, modes=modes)
    out, lse = _run(case, num_splits)
    _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1"})  # the default path
    base, base_lse = _run(case, num_splits)
    _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", **VARIANTS[variant][0]})
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if VARIANTS[variant][1]:
        assert torch.equal(out, base) and torch.equal(lse, base_lse), f"{variant} differs from the default path"
    else:
        scale = base.float().abs().max().item()
        diff = (out.float() - base.float()).abs().max().item()
        print(f"{variant} splits {num_splits}: max |diff| vs default {diff:.3e} (scale {scale:.3e})")
        assert diff <= 2 ** -7 * scale, f"{variant} differs from the default path beyond rounding"
        assert (lse - base_lse).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variant_nonfinite_rule(gen, variant, dtype):
    _nonfinite(gen, dtype, 1, variant)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_variant_nonfinite_in_long_items(gen, variant, num_splits):
    """The non-finite rule in long items of full tiles (1 or 2 per pair: plain copies): an inf K row in the middle of
    the FULL pair makes that pair's rows NaN; NaN rows past the pair's length (never read: the last tile is partial,
    copied with zeros past the item) and a NaN unused STREAM pool row leave every other row finite and equal to the
    reference."""
    modes = torch.tensor([[FULL, STREAM]], dtype=torch.int32)
    case = Case(gen, B=1, Hkv=2, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=[1001], sink=70, window=200,
                modes=modes, max_len=1100)
    case.full_k[case.slot[0, 0], 500, 7] = float("inf")
    case.full_k[case.slot[0, 0], 1001:] = float("nan")
    case.full_v[case.slot[0, 0], 1001:] = float("nan")
    unused = sorted(set(range(case.stream_k.shape[0])) - {int(case.slot[0, 1])})
    case.stream_v[unused[0]] = float("nan")
    args = case.tensors(DEV)
    _poison_allocator(args[0])
    out, lse = decode_attention(*args, sink=case.sink, window=case.window, num_splits=num_splits, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isnan(out[0, 0, :4]).all() and torch.isnan(lse[0, :4]).all(), "the inf key's rows must be NaN"
    assert torch.isfinite(out[0, 0, 4:]).all() and torch.isfinite(lse[0, 4:]).all()
    clean = [_finite_copy(x) for x in case.tensors("cpu", torch.float64)[:5]] + case.tensors("cpu")[5:]
    ref, ref_lse = decode_attention_cpu(*clean, sink=case.sink, window=case.window)
    err = ((out[0, 0, 4:].double() - ref[0, 0, 4:]).abs().max() / ref[0, 0, 4:].abs().max()).item()
    assert err < OUT_TOL[torch.bfloat16], f"STREAM rows: max rel err {err:.3e}"
    assert (lse[0, 4:].double() - ref_lse[0, 4:]).abs().max().item() < 1e-3


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 999])
def test_variant_forced_splits(gen, variant, num_splits):
    _forced_splits(gen, num_splits, variant)


def test_variant_graph_replay(gen, variant):
    _graph_replay(gen, variant)


def test_variant_many_pairs(gen, variant):
    _many_pairs(gen, variant)


def test_variant_launches_its_kernels(gen, variant):
    """The switches reached the launch: one decode_mma_kernel and one combine launch (the case's pairs are split:
    32 items) whatever the variant, and the options string reports the variant's values."""
    desc = elastic_cuda.ops.reload_kernel_options()
    env = VARIANTS[variant][0]
    assert ("decode_copy=zfill" in desc) == (env.get("ELASTIC_DECODE_COPY") == "zfill"), desc
    assert f"decode_pdl={env.get('ELASTIC_DECODE_PDL', '1')}" in desc, desc
    assert f"decode_min_chunk={env.get('ELASTIC_DECODE_MIN_CHUNK', '0')} " in desc + " ", desc
    case = _mixed_case(gen, group=4, D=128, dtype=torch.bfloat16)
    args = case.tensors(DEV)
    names = cuda_kernel_names(lambda: decode_attention(*args, sink=case.sink, window=case.window, num_splits=32),
                              "decode_")
    assert sum("decode_mma_kernel" in n for n in names) == 1, names
    assert sum("decode_combine_kernel" in n for n in names) == 1, names


@pytest.mark.parametrize("value", ["TMA", "tma", "pairs", "100", "-64", "65600", "x"])
def test_switches_reject_bad_values(monkeypatch, value):
    name = "ELASTIC_DECODE_MIN_CHUNK" if value[-1].isdigit() or value == "x" else "ELASTIC_DECODE_COPY"
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=name):
        elastic_cuda.ops.reload_kernel_options()
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


def test_combine_many_items_per_pair(gen, monkeypatch):
    """The combine merges items in rounds of D (decode_combine_kernel): forced splits give the FULL pair ~600 items
    of 32 keys (several rounds at D 64 and 128), against the float64 reference, with and without the programmatic
    dependent launch."""
    for pdl in ("1", "0"):
        _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", "ELASTIC_DECODE_PDL": pdl})
        for D in (64, 128):
            case = Case(gen, B=1, Hkv=2, group=4, Sq=1, D=D, dtype=torch.bfloat16, lengths=[20000], sink=4,
                        window=64, modes=torch.tensor([[FULL, STREAM]], dtype=torch.int32))
            case.check(f"combine rounds pdl {pdl} D{D}", num_splits=1000)


@pytest.mark.parametrize("Sq", [1, 3])
def test_variant_fma_kernel(gen, variant, Sq, monkeypatch):
    """The FMA split kernel (ELASTIC_DECODE_MMA=0, or several queries) under the variant: it shares the plan (chunk
    floor) and the combine launch (PDL) with the tensor-core kernel. Long pairs so that the floor changes the plan."""
    _set(monkeypatch, {"ELASTIC_DECODE_MMA": "0", **VARIANTS[variant][0]})
    modes = torch.tensor([[FULL, STREAM, BLOCK], [STREAM, FULL, STREAM]], dtype=torch.int32)
    case = Case(gen, B=2, Hkv=3, group=4, Sq=Sq, D=128, dtype=torch.bfloat16, lengths=[9001, 3001], sink=70,
                window=700, modes=modes)
    for splits in (0, 7):
        case.check(f"fma {variant} Sq{Sq} splits {splits}", num_splits=splits)
