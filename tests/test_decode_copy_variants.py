"""The tensor-core decode kernel's A/B variants (kernel_options.h: ELASTIC_DECODE_COPY=zfill|tma|pairs (the default:
plain), ELASTIC_DECODE_FUSED_COMBINE=1|v2|v2_keep, ELASTIC_DECODE_LATE_Q=1; csrc/decode/decode_mma_kernel.cuh,
decode_fused_merge.cuh) and the combine's (ELASTIC_DECODE_COMBINE=v2,
ELASTIC_DECODE_PDL=1|early; csrc/decode/decode_combine_v2.cuh, decode_pdl.cuh) against the float64 CPU reference, and
against round 1's path (plain copies, v1 combine) bit for bit (same data, same arithmetic order: only how K/V reach shared memory, or where
and how the combine is launched, differs) or, for the v2 combine (another fp32 summation order), within one 16-bit
rounding step.

Cases are built with test_decode_cuda's Case (fresh random pools, non-identity slots, poisoned outputs) at lengths
that give every kind of tile: full FULL tiles (TMA), an item's partial last tile (cp.async with zeros), STREAM tiles
inside the sink (sink 130 > one 64-key tile), across the sink / ring boundary and across the ring wrap (cp.async),
and plain ring tiles (TMA). Several tests of test_decode_cuda are re-run under each variant (non-finite rule,
forced splits, graph replay with new lengths, 320 pairs).
Run: pytest -s -m gpu tests/test_decode_copy_variants.py
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

# variant -> (switches, kLayout of the decode_mma_kernel instance it must launch on an sm_90 device, fused combine)
VARIANTS = {  # every variant names its combine: the base below is round 1's combine launched plainly
    "zfill": ({"ELASTIC_DECODE_COPY": "zfill", "ELASTIC_DECODE_COMBINE": "v1"}, 0, False),
    "tma": ({"ELASTIC_DECODE_COPY": "tma", "ELASTIC_DECODE_COMBINE": "v1"}, 1, False),
    "pairs": ({"ELASTIC_DECODE_COPY": "pairs", "ELASTIC_DECODE_COMBINE": "v1"}, 2, False),
    "fused": ({"ELASTIC_DECODE_FUSED_COMBINE": "1", "ELASTIC_DECODE_COMBINE": "v1"}, 0, True),
    "tma_fused": ({"ELASTIC_DECODE_COPY": "tma", "ELASTIC_DECODE_FUSED_COMBINE": "1", "ELASTIC_DECODE_COMBINE": "v1"},
                  1, True),
    # The fused combine merged by all threads of the pair's last CTA (decode_fused_merge.cuh), plain and zfill copies:
    "fused_v2": ({"ELASTIC_DECODE_FUSED_COMBINE": "v2", "ELASTIC_DECODE_COMBINE": "v1"}, 0, True),
    "fused_v2_zfill": ({"ELASTIC_DECODE_COPY": "zfill", "ELASTIC_DECODE_FUSED_COMBINE": "v2",
                        "ELASTIC_DECODE_COMBINE": "v1"}, 0, True),
    # the same with the tickets kept at zero across calls instead of a memset per call (diagnostic)
    "fused_v2_keep": ({"ELASTIC_DECODE_FUSED_COMBINE": "v2_keep", "ELASTIC_DECODE_COMBINE": "v1"}, 0, True),
    # Q loaded after the prologue's copies (ELASTIC_DECODE_LATE_Q): alone (bit-equal to round 1's path) and fused
    "late_q": ({"ELASTIC_DECODE_LATE_Q": "1", "ELASTIC_DECODE_COMBINE": "v1"}, 0, False),
    "fused_v2_late_q": ({"ELASTIC_DECODE_FUSED_COMBINE": "v2", "ELASTIC_DECODE_LATE_Q": "1",
                         "ELASTIC_DECODE_COMBINE": "v1"}, 0, True),
    # The combine's variants (round 2's kernel, the default, and launch forms on round 1's split kernel):
    "combine_v2": ({"ELASTIC_DECODE_COMBINE": "v2"}, 0, False),
    "v1_pdl": ({"ELASTIC_DECODE_COMBINE": "v1", "ELASTIC_DECODE_PDL": "1"}, 0, False),
    "v2_pdl": ({"ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "1"}, 0, False),
    "v2_pdl_early": ({"ELASTIC_DECODE_COMBINE": "v2", "ELASTIC_DECODE_PDL": "early"}, 0, False),
}
COMBINE_VARIANTS = ("combine_v2", "v1_pdl", "v2_pdl", "v2_pdl_early")
SWITCHES = ("ELASTIC_DECODE_MMA", "ELASTIC_DECODE_COPY", "ELASTIC_DECODE_FUSED_COMBINE", "ELASTIC_DECODE_ONE_WAVE",
            "ELASTIC_DECODE_COMBINE", "ELASTIC_DECODE_PDL", "ELASTIC_DECODE_LATE_Q")


def _combine_v2(variant):
    return VARIANTS[variant][0].get("ELASTIC_DECODE_COMBINE") == "v2"


def _trigger(variant):
    """kTrigger of the decode_mma_kernel instance the variant launches (decode_pdl.cuh): PDL only on sm_90+."""
    if torch.cuda.get_device_capability()[0] < 9:
        return 0
    return {"0": 0, "1": 1, "early": 2}[VARIANTS[variant][0].get("ELASTIC_DECODE_PDL", "0")]


def _variant_flags(variant):
    """kVariant of the decode_mma_kernel instance the variant launches (decode_mma_kernel.cuh MmaVariant): 1 the
    all-thread fused merge, 2 Q loaded late."""
    env = VARIANTS[variant][0]
    return ((1 if env.get("ELASTIC_DECODE_FUSED_COMBINE", "0").startswith("v2") else 0)
            | (2 if env.get("ELASTIC_DECODE_LATE_Q") == "1" else 0))


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
    """The variant against round 1's path (plain copies, v1 combine) on the same inputs (the issue's routing, batch 2, ring wrapped): the copy
    variants move the same bytes into the same MMAs, so the outputs are equal bit for bit; the fused combine runs the
    combine kernel's arithmetic (combine_element) in another kernel: equal to the last bit expected too, allowed
    one 16-bit rounding step; a PDL launch of round 1's combine changes only when it starts: equal bit for bit; the
    v2 combine sums the same fp32 terms in another order (item groups, then 1 / L): each output element within one
    16-bit rounding step of the default's (or 1e-4 of the largest element), lse within fp32 rounding. num_splits
    999 gives ~200 items to a FULL pair (the v2 combine's rounds of 128 items, merged as an online softmax)."""
    modes = torch.tensor([[STREAM, FULL, STREAM, STREAM, FULL, STREAM, STREAM, STREAM],
                          [FULL, STREAM, STREAM, FULL, STREAM, STREAM, BLOCK, STREAM]], dtype=torch.int32)
    case = Case(gen, B=2, Hkv=8, group=4, Sq=1, D=128, dtype=torch.bfloat16, lengths=[20001, 9001], sink=128,
                window=2048, modes=modes)
    out, lse = _run(case, num_splits)
    _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", "ELASTIC_DECODE_COMBINE": "v1"})  # round 1's path, plain copies
    base, base_lse = _run(case, num_splits)
    _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", **VARIANTS[variant][0]})
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if VARIANTS[variant][2]:
        scale = base.float().abs().max().item()
        assert (out.float() - base.float()).abs().max().item() <= 2 ** -7 * scale, "fused combine differs"
        assert (lse - base_lse).abs().max().item() <= 1e-5
    elif _combine_v2(variant):
        diff = (out.float() - base.float()).abs()
        # One bf16 step of the element, or 1e-4 of the largest: fp32 sums of ~200 mixed-sign terms near an element
        # close to 0 can straddle more than one step of that element (a wrong weight gives ~1e-2 of the largest).
        bound = 2 ** -7 * base.float().abs() + 1e-4 * base.float().abs().max()
        rel = (diff.max() / base.float().abs().max()).item()
        print(f"{variant} splits {num_splits}: max |v2 - v1| / max |v1| {rel:.3e}, "
              f"elements differing {int((diff > 0).sum())} of {diff.numel()}, "
              f"max lse diff {(lse - base_lse).abs().max().item():.3e}")
        assert bool((diff <= bound).all()), f"{variant}: an element differs by more than one 16-bit rounding step"
        assert (lse - base_lse).abs().max().item() <= 1e-5 * max(1.0, base_lse.abs().max().item())
    else:
        assert torch.equal(out, base) and torch.equal(lse, base_lse), f"{variant} differs from round 1's path"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variant_nonfinite_rule(gen, variant, dtype):
    _nonfinite(gen, dtype, 1, variant)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_variant_nonfinite_in_tma_tiles(gen, variant, num_splits):
    """The non-finite rule where the copies are TMA boxes: long items (1 or 2 per pair) of full tiles. An inf K
    row in the middle of the FULL pair (a TMA tile) makes that pair's rows NaN; NaN rows past the pair's length
    (never read: the last tile is partial, copied with zeros past the item) and a NaN unused STREAM pool row leave
    every other row finite and equal to the reference."""
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
    """The switch reached the kernel: the decode_mma_kernel instance of the variant's layout (TMA on sm_90 devices
    only; elsewhere the launch falls back to the cp.async instance) and PDL trigger (sm_90+ only), and a combine
    launch iff the combine is not fused (the case's pairs are split: 32 items), of the variant's combine kernel."""
    _, layout, fused = VARIANTS[variant]
    if layout == 1 and torch.cuda.get_device_capability()[0] != 9:
        layout = 0
    case = _mixed_case(gen, group=4, D=128, dtype=torch.bfloat16)
    args = case.tensors(DEV)
    names = cuda_kernel_names(lambda: decode_attention(*args, sink=case.sink, window=case.window, num_splits=32),
                              "decode_")
    mma = [n for n in names if "decode_mma_kernel" in n]
    assert len(mma) == 1, names
    # decode_mma_kernel<T, D, kRows, kLayout, kTrigger, kVariant>
    m = re.search(r"decode_mma_kernel<[^,<>]+,\s*\d+,\s*\d+,\s*(\d+),\s*(\d+),\s*(\d+)>", mma[0])
    assert m is not None and int(m.group(1)) == layout, mma[0]
    assert int(m.group(2)) == _trigger(variant), mma[0]
    assert int(m.group(3)) == _variant_flags(variant), mma[0]
    v1 = [n for n in names if "decode_combine_kernel<" in n]
    v2 = [n for n in names if "decode_combine_v2_kernel<" in n]
    assert len(v1) + len(v2) == (0 if fused else 1), names
    assert bool(v2) == (_combine_v2(variant) and not fused), names


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [3, 4, 8])
def test_fused_merge_many_rounds(gen, D, group, monkeypatch):
    """ELASTIC_DECODE_FUSED_COMBINE=v2 where a pair has more items than one round of the merge (kMergeRound 256):
    a FULL pair of 20001 keys cut into ~625 items of 32 keys (3 rounds merged as an online softmax), a wrapped STREAM
    pair and a BLOCK pair beside it, every column mapping of the merge (D 64 / 128 x 4 / 8 rows, group 3 with an idle
    row), against float64; and against the v2 combine kernel on the same inputs (same weights, another fp32 order)."""
    _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", "ELASTIC_DECODE_FUSED_COMBINE": "v2"})
    modes = torch.tensor([[FULL, STREAM, BLOCK]], dtype=torch.int32)
    case = Case(gen, B=1, Hkv=3, group=group, Sq=1, D=D, dtype=torch.bfloat16, lengths=[20001], sink=37,
                window=700, modes=modes)
    for splits in (1500, 0):
        out, lse = case.check(f"fused_v2 D{D} G{group} splits {splits}", num_splits=splits)
        _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", "ELASTIC_DECODE_COMBINE": "v2"})
        base, base_lse = _run(case, splits)
        _set(monkeypatch, {"ELASTIC_DECODE_MMA": "1", "ELASTIC_DECODE_FUSED_COMBINE": "v2"})
        diff = (out.float().to(DEV) - base.float()).abs()
        bound = 2 ** -7 * base.float().abs() + 1e-4 * base.float().abs().max()
        assert bool((diff <= bound).all()), f"fused_v2 D{D} G{group} splits {splits}: differs from the v2 combine"
        assert (lse.to(DEV) - base_lse).abs().max().item() <= 1e-5 * max(1.0, base_lse.abs().max().item())
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


@pytest.fixture(params=list(COMBINE_VARIANTS))
def combine_variant(request, monkeypatch):
    """The combine's variants alone (the tensor-core / FMA choice left to the test)."""
    _set(monkeypatch, VARIANTS[request.param][0])
    yield request.param
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()


@pytest.mark.parametrize("mma", ["1", "0"])
@pytest.mark.parametrize("Sq", [1, 2, 5])
def test_combine_variant_fma_and_mma_paths(gen, combine_variant, Sq, mma, monkeypatch):
    """Both split kernels feed the combine (steps of several queries always run the FMA kernel, whose partials hold
    rows of several query positions and row chunks at group 8): float64 reference for automatic and forced plans."""
    monkeypatch.setenv("ELASTIC_DECODE_MMA", mma)
    assert f"decode_mma={mma}" in elastic_cuda.ops.reload_kernel_options()
    for group, D in ((4, 128), (8, 64)):
        lengths = [max(Sq, n) for n in (Sq, 700, 2900)]
        case = Case(gen, B=3, Hkv=2, group=group, Sq=Sq, D=D, dtype=torch.bfloat16, lengths=lengths, sink=9,
                    window=333)
        for splits in (0, 5, 999):
            case.check(f"{combine_variant} mma={mma} Sq{Sq} G{group} D{D} splits {splits}", num_splits=splits)


@pytest.mark.parametrize("switch, typo", [("ELASTIC_DECODE_FUSED_COMBINE", "2"), ("ELASTIC_DECODE_COPY", "TMA")])
def test_decode_switch_rejects_typos(switch, typo, monkeypatch):
    monkeypatch.setenv(switch, typo)
    with pytest.raises(RuntimeError, match=switch):
        elastic_cuda.ops.reload_kernel_options()
    monkeypatch.undo()
    elastic_cuda.ops.reload_kernel_options()
