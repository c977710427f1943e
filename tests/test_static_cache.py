"""ElasticStaticCache (elastic_cuda/integrations/static_cache.py) and the CPU decode op, on CPU.

Layer-level tests drive one ElasticStaticLayer with random keys and compare every decode step with elastic attention
over each sample's whole history (elastic_cuda.ops.attention, fp64): < 1e-12. generate() tests use tiny random
Llama models in fp64 (transformers returns fp32 logits: < 1e-6).
"""
import pytest
import torch
from conftest import rel_err, static_commit_case

transformers = pytest.importorskip("transformers")

from test_transformers import SINK, WINDOW, _ids, decisive, make_model, reference_logits  # noqa: E402

from elastic_cuda.attention import PaddingLayout, causal_pairs, visible_pairs  # noqa: E402
from elastic_cuda.integrations.static_cache import ElasticStaticCache, ElasticStaticLayer  # noqa: E402
from elastic_cuda.integrations.transformers import enable  # noqa: E402
from elastic_cuda.ops import BLOCK, FULL, STREAM, attention, decode_attention, static_cache_commit  # noqa: E402
from elastic_cuda.router import RouterSet  # noqa: E402

H, D, G = 3, 8, 2  # KV heads, head dim, query heads per KV head


class History:
    """One ElasticStaticLayer plus every sample's whole history, to check each step against full recompute."""

    def __init__(self, modes, lengths, *, sink=2, window=5, max_query_len=4, max_cache_len=64, max_full_frac=None,
                 gen=None):
        self.gen = gen or torch.Generator().manual_seed(0)
        self.sink, self.window = sink, window
        self.layer = ElasticStaticLayer(0, num_kv_heads=H, max_batch_size=len(modes) + 1,
                                        max_cache_len=max_cache_len, sink=sink, window=window,
                                        max_query_len=max_query_len, max_full_frac=max_full_frac)
        self.prompt(modes, lengths)

    def prompt(self, modes, lengths):
        """A prompt per sample (left-padded to the longest) committed with `modes`."""
        sink, window = self.sink, self.window
        self.modes = torch.tensor(modes, dtype=torch.int32)
        B = self.modes.shape[0]
        S = max(lengths)
        k, v = self.rand(B, S), self.rand(B, S)
        mask = torch.zeros(B, S, dtype=torch.bool)
        for b, n in enumerate(lengths):
            mask[b, S - n:] = True  # left padding
        self.layer.update(k, v)
        self.layer.commit_prefill(self.modes, PaddingLayout.from_mask(mask, S, S), sink=sink, window=window)
        self.k = [k[b][:, S - n:] for b, n in enumerate(lengths)]  # [H, n, D] per sample
        self.v = [v[b][:, S - n:] for b, n in enumerate(lengths)]

    def rand(self, B, S):
        return torch.randn(B, H, S, D, dtype=torch.float64, generator=self.gen)

    def step(self, Sq):
        B = len(self.k)
        k, v = self.rand(B, Sq), self.rand(B, Sq)
        self.layer.update(k, v)
        self.k = [torch.cat([self.k[b], k[b]], 1) for b in range(B)]
        self.v = [torch.cat([self.v[b], v[b]], 1) for b in range(B)]
        q = torch.randn(B, H * G, Sq, D, dtype=torch.float64, generator=self.gen)
        got = self.layer.attend(q, 0.3)
        for b in range(B):
            modes = torch.where(self.modes[b:b + 1] == BLOCK, FULL, self.modes[b:b + 1])  # BLOCK decodes densely
            want = attention(q[b:b + 1].transpose(1, 2), self.k[b].transpose(0, 1)[None],
                             self.v[b].transpose(0, 1)[None], modes, sink=self.sink, window=self.window, scale=0.3)
            assert rel_err(got[b:b + 1], want) < 1e-12, b
        assert self.layer.seq_lens.tolist() == [x.shape[1] for x in self.k]


MODES = [[FULL, STREAM, BLOCK], [STREAM, STREAM, FULL], [STREAM, FULL, FULL]]


def test_decode_steps_match_recompute_with_padding_and_ring_wraparound():
    """Per-sample routing, left padding (lengths 9, 3, 6), single-token and speculative steps; the ring (5 + 3 rows)
    wraps several times."""
    hist = History(MODES, [9, 3, 6])
    for Sq in [1, 1, 4, 2, 1, 3, 4, 1, 1, 4, 4, 2]:
        hist.step(Sq)
    layer = hist.layer
    assert layer.full.pairs == 5 and layer.stream.pairs == 4        # pools sized from the routing
    assert layer.stream.tokens == 2 + 5 + 4 - 1
    assert layer.slot.tolist() == [[0, 0, 1], [1, 2, 2], [3, 3, 4]]


def test_prompts_shorter_than_the_sink():
    """Prompts of 1..3 tokens under a sink of 4 (the commit used to build an empty-range arange and raise); the
    decode steps then fill the sink and wrap the ring."""
    hist = History(MODES, [1, 3, 2], sink=4, window=3)
    for Sq in [1, 2, 4, 1, 3, 4, 4]:
        hist.step(Sq)


def test_reset_then_new_prompts_reuse_the_layer():
    """A serving lifetime: reset() and a new prompt of the same batch size reuse the pools and tables in place (static
    addresses for captured decode steps) while its routing fits them, and grow only the pool that a denser routing
    needs; every decode step still matches recompute, and the decode pair counts start again from zero."""
    hist = History(MODES, [9, 3, 6])
    for Sq in [1, 3, 1]:
        hist.step(Sq)
    layer = hist.layer
    assert float(layer.decode_pairs[1]) > 0
    addresses = [t.data_ptr() for t in (layer.full.k_store, layer.stream.k_store, layer.head_mode, layer.slot,
                                        layer.is_whole, layer.seq_lens)]
    layer.reset()
    assert not layer.prefilled and float(layer.decode_pairs.abs().sum()) == 0
    hist.prompt([[STREAM, FULL, STREAM], [BLOCK, FULL, STREAM], [STREAM, FULL, BLOCK]], [2, 11, 7])  # 5 whole, 4
    assert [t.data_ptr() for t in (layer.full.k_store, layer.stream.k_store, layer.head_mode, layer.slot,
                                   layer.is_whole, layer.seq_lens)] == addresses
    assert int(layer.cumulative_length) == 11 and float(layer.decode_pairs.abs().sum()) == 0
    for Sq in [2, 1, 4, 1, 4, 4]:
        hist.step(Sq)
    layer.reset()
    hist.prompt([[FULL, FULL, FULL], [FULL, BLOCK, FULL], [STREAM, FULL, FULL]], [5, 5, 1])  # 8 whole: grows
    assert layer.full.pairs == 8 and layer.stream.k_store.data_ptr() == addresses[1]
    for Sq in [1, 4, 2]:
        hist.step(Sq)


def test_crop_and_reorder_keep_every_visible_key():
    hist = History(MODES, [7, 4, 11], max_full_frac=1.0)  # pools for any routing: the reorder duplicates rows
    for Sq in (4, 1, 3):
        hist.step(Sq)
    hist.layer.crop(-3)  # a rejected draft of 3 tokens
    hist.k = [k[:, :-3] for k in hist.k]
    hist.v = [v[:, :-3] for v in hist.v]
    hist.step(2)
    # Beam reorder that duplicates a sample and drops another: rows move between pool rows.
    beam = torch.tensor([2, 0, 2])
    hist.layer.reorder_cache(beam)
    hist.modes = hist.modes[beam]
    hist.k, hist.v = [hist.k[i] for i in beam], [hist.v[i] for i in beam]
    for Sq in (1, 4, 1):
        hist.step(Sq)
    hist.layer.batch_select_indices(torch.tensor([1, 2]))
    hist.modes, hist.k, hist.v = hist.modes[1:], hist.k[1:], hist.v[1:]
    hist.step(1)


def test_refusals_are_clear():
    hist = History(MODES, [5, 5, 5], max_query_len=2, max_cache_len=12)
    with pytest.raises(ValueError, match="max_query_len=2"):
        hist.layer.update(hist.rand(3, 3), hist.rand(3, 3))
    with pytest.raises(ValueError, match="at most that many"):
        hist.layer.crop(-3)
    hist.step(2)
    hist.step(2)
    hist.step(2)
    with pytest.raises(RuntimeError, match="exceed max_cache_len=12"):  # 11 cached + 2 (checked on the device)
        hist.layer.update(hist.rand(3, 2), hist.rand(3, 2))
    # Rows of a denser routing than the pools hold: the routing-sized pools have 5 whole-history rows.
    with pytest.raises(ValueError, match="whole-history"):
        hist.layer.reorder_cache(torch.tensor([2, 2, 2]))
    with pytest.raises(ValueError, match="max_full_frac=0.25 holds 3"):
        History(MODES, [4, 4, 4], max_full_frac=0.25)


def test_memory_is_what_the_routing_keeps():
    hist = History(MODES, [6, 6, 6], max_cache_len=100)
    layer, elem = hist.layer, 8
    whole_rows, stream_rows = 5 * 100 + 1, 4 * (2 + 5 + 4 - 1) + 1
    tables = 3 * 3 * (4 + 4 + 1) + 3 * 4
    assert layer.memory_bytes() == 2 * (whole_rows + stream_rows) * D * elem + tables
    assert layer.dense_memory_bytes() == 2 * 4 * H * 100 * D * elem  # max_batch_size 4
    fixed = History(MODES, [6, 6, 6], max_cache_len=100, max_full_frac=0.5)
    assert fixed.layer.full.pairs == 6 and fixed.layer.stream.pairs == 12


def expected_commit(args, sink):
    """The pools, slots and lengths static_cache_commit must leave, token by token: pairs of each kind numbered in
    (sample, head) order; sample b's valid tokens are the last n of its row (left padding); a STREAM pair keeps its
    first `sink` tokens and its last (rows - sink) at sink + (p - sink) % (rows - sink)."""
    keys, values, modes, cu = args[0], args[1], args[2], args[3]
    full_k, full_v, stream_k, stream_v = (a.clone() for a in args[5:9])
    B, H, S, _ = keys.shape
    ring = stream_k.shape[1] - sink
    slot = torch.zeros(B, H, dtype=torch.int32)
    lengths = [S] * B if cu is None else [int(cu[b + 1] - cu[b]) for b in range(B)]
    ranks = {True: 0, False: 0}
    for b in range(B):
        n = lengths[b]
        for h in range(H):
            whole = int(modes[b, h]) != STREAM
            slot[b, h] = r = ranks[whole]
            ranks[whole] += 1
            for p in range(n):
                src = S - n + p
                if whole:
                    full_k[r, p], full_v[r, p] = keys[b, h, src], values[b, h, src]
                elif p < sink or p >= n - ring:
                    row = p if p < sink else sink + (p - sink) % ring
                    stream_k[r, row], stream_v[r, row] = keys[b, h, src], values[b, h, src]
    return (full_k, full_v, stream_k, stream_v, modes, slot, modes != STREAM,
            torch.tensor(lengths, dtype=torch.int32))


@pytest.mark.parametrize("lengths,sink,ring", [([9, 3, 6], 2, 4), ([5, 5], 8, 3), ([1, 2, 3], 0, 2),
                                               ([4], 2, 9), ([7, 7, 1, 6], 3, 3)])
def test_commit_op_places_every_token(lengths, sink, ring):
    """elastic::static_cache_commit's CPU kernel against a token-by-token placement: left padding, S < sink, S <
    ring, lengths 1..3, sink 0, rings that wrap; NaN-poisoned pools, so a stray or missing write fails."""
    gen = torch.Generator().manual_seed(len(lengths) * 100 + sink * 10 + ring)
    args, kw = static_commit_case(len(lengths), H, max(lengths), D, lengths, gen, sink=sink, ring=ring)
    want = expected_commit(args, sink)
    static_cache_commit(*args, **kw)
    for got, exp in zip(args[5:13], want, strict=True):
        assert torch.equal(got.isnan(), exp.isnan()) and torch.equal(got.nan_to_num(), exp.nan_to_num())


def test_commit_op_checks_arguments():
    gen = torch.Generator().manual_seed(0)
    args, kw = static_commit_case(2, H, 5, D, [5, 3], gen, sink=2, ring=3, modes=torch.tensor([[0, 1, 1]] * 2))
    with pytest.raises(ValueError, match="2 whole-history and 4 STREAM pairs; the pools hold 1 and 5"):
        static_cache_commit(*args[:5], args[5][:1], args[6][:1], *args[7:], **kw)
    with pytest.raises(ValueError, match="slot must be int32"):
        static_cache_commit(*args[:10], args[10].long(), *args[11:], **kw)
    with pytest.raises(ValueError, match="is_whole must be bool"):
        static_cache_commit(*args[:11], args[11].int(), args[12], **kw)
    with pytest.raises(ValueError, match="cu_seqlens and token_index come together"):
        static_cache_commit(*args[:4], None, *args[5:], **kw)
    with pytest.raises(ValueError, match="sink must be an int in \\[0, stream_k.shape\\[1\\]=5\\)"):
        static_cache_commit(*args, sink=5)
    with pytest.raises(ValueError, match="stream_v must be a \\[pairs, tokens, D=8\\] pool"):
        static_cache_commit(*args[:8], args[8][..., :4], *args[9:], **kw)
    static_cache_commit(*args, **kw)  # (and the arguments as given are right)


def test_decode_op_checks_arguments():
    q = torch.randn(1, 1, 4, 8)
    pool = torch.zeros(2, 16, 8)
    ring = torch.zeros(2, 10, 8)
    modes = torch.zeros(1, 2, dtype=torch.int32)
    lens = torch.full((1,), 3, dtype=torch.int32)
    kw = dict(sink=2, window=5)
    assert decode_attention(q, pool, pool, ring, ring, modes, modes, lens, **kw).shape == q.shape
    with pytest.raises(ValueError, match="q must hold 1..16"):
        decode_attention(torch.randn(1, 17, 4, 8), pool, pool, ring, ring, modes, modes, lens, **kw)
    with pytest.raises(ValueError, match="slot must be int32"):
        decode_attention(q, pool, pool, ring, ring, modes, modes.long(), lens, **kw)
    with pytest.raises(ValueError, match="stream_k holds 6"):
        decode_attention(q, pool, pool, ring[:, :6], ring[:, :6], modes, modes, lens, **kw)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        decode_attention(torch.randn(1, 1, 3, 8), pool, pool, ring, ring, modes, modes, lens, **kw)
    with pytest.raises(ValueError, match="slot\\[0, 1\\] = 5"):
        decode_attention(q, pool, pool, ring, ring, modes, torch.tensor([[0, 5]], dtype=torch.int32), lens, **kw)
    with pytest.raises(ValueError, match="head_mode\\[0, 0\\] = 3"):
        decode_attention(q, pool, pool, ring, ring, torch.tensor([[3, 0]], dtype=torch.int32), modes, lens, **kw)


def test_decode_step_compiles_without_graph_breaks():
    """update() + attend() of a decode step trace in one graph (no host reads): what CUDA graphs need."""
    hist = History(MODES, [9, 3, 6])
    layer = hist.layer

    def step(k, v, q):
        layer.update(k, v)
        return layer.attend(q, 0.3)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for _ in range(3):
        k, v = hist.rand(3, 1), hist.rand(3, 1)
        q = torch.randn(3, H * G, 1, D, dtype=torch.float64, generator=hist.gen)
        compiled(k, v, q)
    assert layer.seq_lens.tolist() == [12, 6, 9]


# ----------------------------------------------------------------------------- generate on a tiny Llama
def _left_padded(lengths, seed):
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = _ids(1, n, seed=seed + b)[0]
        mask[b, S - n:] = 1
    return ids, mask


def _generate(model, ids, mask, new_tokens, cache=None):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def test_generate_all_full_equals_dense_cache():
    model = make_model("llama", dtype=torch.float64, seed=21)
    ids, mask = _left_padded([17, 9], seed=21)
    enable(model, policy="all_full")
    cache = ElasticStaticCache(model, max_batch_size=2, max_cache_len=40)
    static = _generate(model, ids, mask, 12, cache)
    dense = _generate(model, ids, mask, 12)
    assert torch.equal(static.sequences, dense.sequences)
    for step in range(12):
        assert rel_err(static.logits[step], dense.logits[step]) < 1e-9
    # All FULL: the whole-history pool is the dense cache plus one scratch row (and the tables).
    assert cache.memory_bytes() > cache.dense_memory_bytes()
    assert cache.memory_bytes() < cache.dense_memory_bytes() * 1.1


def test_generate_with_per_sample_routing_equals_recompute():
    """64 greedy tokens, per-sample routing (router policy with a per-request sparsity shift), left padding: every
    step's logits equal the prefill-only elastic reference over the whole sequence with the prompt's routing."""
    model = make_model("llama", dtype=torch.float64, seed=22)
    routers = decisive(RouterSet.for_model(model).double(), seed=2)
    lengths = [30, 19, 24]
    ids, mask = _left_padded(lengths, seed=22)
    state = enable(model, routers, policy="router", sink=SINK, window=WINDOW,
                   sparsity_shift=torch.tensor([3.0, -3.0, 0.0]))
    cache = ElasticStaticCache(model, max_batch_size=3, max_cache_len=100)
    new = 64
    gen = _generate(model, ids, mask, new, cache)
    modes = state.last_head_mode.clone()  # [B, L, Hkv]
    assert len({tuple(m.flatten().tolist()) for m in modes}) == 3, modes  # three different routings
    assert (modes == STREAM).any() and (modes == FULL).any()
    S = ids.shape[1]
    for b, n in enumerate(lengths):
        seq = gen.sequences[b:b + 1, S - n:]
        ref = reference_logits(model, seq[:, :-1], modes[b:b + 1])  # [1, n + new - 1, V]
        for step in range(new):
            assert rel_err(gen.logits[step][b], ref[0, n - 1 + step]) < 1e-6, (b, step)
    assert cache.memory_bytes() < 0.75 * cache.dense_memory_bytes()
    # The decode steps' pair counts (ESR of decode) against the closed forms of attention.sparsity.
    counts = cache.decode_pair_counts()
    for layer in range(modes.shape[1]):
        visible = causal = 0
        for b, n in enumerate(lengths):
            for step in range(1, new):  # the first new token comes from the prompt's forward
                for mode in modes[b, layer].tolist():
                    causal += causal_pairs(1, n + step)
                    visible += causal_pairs(1, n + step) if mode == FULL else \
                        visible_pairs(STREAM, 1, n + step, SINK, WINDOW)
        assert counts[layer].tolist() == [visible, causal], layer


def test_model_decode_step_is_one_graph():
    """A whole decode forward of the model (transformers' mask creation, RoPE, cache update, decode op) traces as one
    graph with no break, which is what transformers' compile path needs to capture it in a CUDA graph."""
    model = make_model("llama", seed=23)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=SINK, window=WINDOW)
    ids, mask = _left_padded([20, 13], seed=23)
    cache = ElasticStaticCache(model, max_batch_size=2, max_cache_len=40)
    with torch.no_grad():
        nxt = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        pos = mask.sum(1, keepdim=True) - 1

        def step(nxt, mask, pos):
            return model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache).logits

        explained = torch._dynamo.explain(step)(nxt, mask, pos)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_beam_search_equals_dense_cache():
    """generate(num_beams=3) reorders the cache every step (reorder_cache): same beams as the dynamic cache."""
    model = make_model("llama", dtype=torch.float64, seed=24)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=SINK, window=WINDOW)
    ids, mask = _left_padded([18, 11], seed=24)
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        cache = ElasticStaticCache(model, max_batch_size=6, max_cache_len=40)
        static = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(static.sequences, dense.sequences)
    assert rel_err(static.sequences_scores, dense.sequences_scores) < 1e-9


def test_prompt_lookup_decoding_verifies_drafts_and_crops(monkeypatch):
    """Speculative decoding (transformers' prompt lookup: drafts of up to 3 tokens, verified in one step of up to 4
    queries, rejected tokens cropped) gives the tokens of plain greedy decoding."""
    model = make_model("llama", dtype=torch.float64, seed=25)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=SINK, window=WINDOW)
    ids = _ids(1, 30, seed=25)
    ids[0, 15:] = ids[0, :15]  # repeated n-grams: the lookup finds drafts
    steps, crops = [], []
    update, crop = ElasticStaticLayer.update, ElasticStaticLayer.crop
    monkeypatch.setattr(ElasticStaticLayer, "update",
                        lambda self, k, v, *a, **kw: (steps.append(k.shape[2]), update(self, k, v, *a, **kw))[1])
    monkeypatch.setattr(ElasticStaticLayer, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        cache = ElasticStaticCache(model, max_batch_size=1, max_cache_len=60)
        speculative = model.generate(ids, past_key_values=cache, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(speculative, plain)
    assert max(steps[2:]) > 1, steps  # multi-token verification steps ran over the cache
    assert any(n < 0 for n in crops), crops


def test_block_mode_keeps_block_heads_whole_and_decodes_them_densely():
    """sparse_mode block: BLOCK pairs go to the whole-history pool and decode densely, as with the dynamic cache."""
    model = make_model("qwen3", dtype=torch.float64, seed=26)
    table = torch.tensor([[1, 0], [0, 1]])
    state = enable(model, policy="fixed", fixed_table=table, xattn_threshold=0.5, sparse_mode="block", block_size=8,
                   xattn_stride=2)
    ids, mask = _left_padded([30, 22], seed=26)
    cache = ElasticStaticCache(model, max_batch_size=2, max_cache_len=50)
    static = _generate(model, ids, mask, 8, cache)
    dense = _generate(model, ids, mask, 8)
    assert (state.last_head_mode == BLOCK).any()
    assert torch.equal(static.sequences, dense.sequences)
    for step in range(8):
        assert rel_err(static.logits[step], dense.logits[step]) < 1e-9
    assert all(layer.stream.pairs == 0 and layer.full.pairs == 4 for layer in cache.layers)


def test_greedy_generate_over_static_cache_equals_elastic_cache():
    """The demo/eval loop (integrations.generate.greedy_generate: plain forwards, no cache_position, no mask) over
    ElasticStaticCache gives the tokens of ElasticCache, and static_cache_for keeps CPU models on their own cache."""
    from elastic_cuda.integrations.cache import ElasticCache
    from elastic_cuda.integrations.generate import greedy_generate, static_cache_for

    model = make_model("llama", dtype=torch.float64, seed=27)
    enable(model, policy="fixed", fixed_table=torch.tensor([[1, 0], [0, 1]]), sink=SINK, window=WINDOW)
    ids = _ids(1, 26, seed=27)
    assert static_cache_for(model, 60) is None  # CPU: the decode op's fast path is CUDA only
    dyn = greedy_generate(model, ids, 20, stop_ids=-1, cache=ElasticCache(model))
    cache = ElasticStaticCache(model, max_batch_size=1, max_cache_len=60)
    static = greedy_generate(model, ids, 20, stop_ids=-1, cache=cache)
    assert static.tokens == dyn.tokens and len(static.tokens) == 20
    assert int(cache.layers[0].seq_lens[0]) == 26 + 19  # the last token is picked, not fed back
