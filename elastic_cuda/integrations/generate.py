"""Greedy decoding with a KV cache, the one loop the demo and the eval share, and the tokens that end a turn; and
greedy decoding of a batch with the decode step replayed from one captured CUDA graph (serving benchmarks).

transformers' own `generate` would do, but the callers need what it does not give: the elastic state's metrics
right after the prefill (before decode steps add their pairs to the ESR), and the prefill and decode times apart.
graphed_greedy_generate captures the step by hand (torch.cuda.CUDAGraph) instead of through torch.compile: the same
graph-replay cost on both sides of a comparison (transformers' StaticCache with SDPA, ElasticStaticCache with the
decode op), without minutes of compilation for an 8B model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["Generation", "GraphedGeneration", "graphed_greedy_generate", "greedy_generate", "static_cache_for",
           "stop_token_ids"]


def stop_token_ids(tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's eos, and the chat end-of-turn / end-of-text tokens it knows."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        try:
            i = tokenizer.convert_tokens_to_ids(tok)
        except (KeyError, ValueError):
            continue
        if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
            ids.add(i)
    return ids


def static_cache_for(model, max_cache_len: int, max_batch_size: int = 1):
    """An ElasticStaticCache for `model` when its decode steps can run the CUDA decode op: elastic attention enabled
    (elastic_cuda.enable), parameters on a CUDA device in fp16/bf16, head_dim 64 or 128. Else None: the caller
    keeps its dynamic cache (CPU runs, other dtypes). Its decode steps keep only what each head's routing needs
    (STREAM heads: sink + window), as ElasticCache does, in preallocated pools."""
    if getattr(model, "elastic_state", None) is None:
        return None
    p = next(model.parameters())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128):
        return None
    from .static_cache import ElasticStaticCache

    return ElasticStaticCache(model, max_batch_size=max_batch_size, max_cache_len=max_cache_len)


@dataclass
class Generation:
    tokens: list[int]                # the new tokens (with the stop token at the end when keep_stop found one)
    prefill_s: float                 # wall time of the prompt's forward (device-synchronised)
    decode_s: float                  # wall time of the decode steps
    prefill_metrics: dict = field(default_factory=dict)  # model.elastic_state.metrics() after the prefill, else {}


@torch.no_grad()
def greedy_generate(model, input_ids, max_new_tokens: int, stop_ids, *, cache=None,
                    keep_stop: bool = False) -> Generation:
    """Greedy decoding of one prompt (input_ids: a list of ids or a tensor [1, S]) with a KV cache (`cache`, e.g.
    an ElasticCache; default: the model's own). Stops after max_new_tokens new tokens or at a token of `stop_ids`
    (an id or a collection of ids), which is kept in `tokens` only with keep_stop."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"greedy_generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stop = set(stop_ids) if isinstance(stop_ids, (list, tuple, set, frozenset)) else {stop_ids}
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kw = {} if cache is None else {"past_key_values": cache}
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t1 = time.perf_counter()
    state = getattr(model, "elastic_state", None)
    metrics = state.metrics() if state is not None else {}  # (reads the ESR counts: outside both timings)
    t_decode = time.perf_counter()
    tokens = []
    while True:
        nxt = int(token)
        if nxt in stop:
            if keep_stop:
                tokens.append(nxt)
            break
        tokens.append(nxt)
        if len(tokens) >= max_new_tokens:
            break
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    return Generation(tokens, t1 - t0, time.perf_counter() - t_decode, metrics)


@dataclass
class GraphedGeneration:
    tokens: torch.Tensor             # int64 [B, new_tokens]: the first from the prefill, the rest from decode steps
    logits: torch.Tensor | None      # fp32 [new_tokens, B, vocab] (the logits each token was picked from) if kept
    prefill_s: float                 # wall time of the prompt's forward (device-synchronised)
    capture_s: float                 # eager warm-up steps and the capture
    decode_s: float                  # wall time of the replayed steps
    replayed_steps: int              # decode steps replayed from the graph (each B tokens)

    def decode_tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.replayed_steps / self.decode_s if self.decode_s > 0 else float("nan")


@torch.no_grad()
def graphed_greedy_generate(model, input_ids, cache, new_tokens: int, *, eager_steps: int = 2,
                            keep_logits: bool = False, dense_mask: bool = True) -> GraphedGeneration:
    """Greedy generation of B unpadded prompts input_ids [B, S] on a CUDA device into a static cache (`cache`:
    transformers' StaticCache or an ElasticStaticCache, fresh or reset): the prompt's forward eagerly, then
    eager_steps eager decode steps on a side stream (lazy initialisations happen outside the capture), then one
    decode step captured as a CUDA graph and replayed for the remaining new_tokens - 1 - eager_steps tokens. The step
    reads its token and position from static buffers and writes the next ones back, so a replay needs no host work
    but one copy of the token into the output. Every sample has the same length (no padding: a padded batch needs
    per-sample positions, which this loop does not keep).
    dense_mask=False (StaticCache only; benchmarks): no mask, so transformers drops it and SDPA runs its GQA kernels
    (flash / cuDNN, no repeat_kv copy) over every slot of the static cache, the empty ones past the sequence included:
    the time of a dense decode at its best, but the tokens are NOT a correct decode (the zero keys of the <= new_tokens
    + 1 empty slots take part in the softmax)."""
    if not isinstance(new_tokens, int) or new_tokens < eager_steps + 2:
        raise ValueError(f"graphed_greedy_generate: new_tokens must be an int >= eager_steps + 2 = {eager_steps + 2}, "
                         f"got {new_tokens!r}")
    if not isinstance(dense_mask, bool):
        raise ValueError(f"graphed_greedy_generate: dense_mask must be a bool, got {dense_mask!r}")
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.device.type != "cuda":
        raise ValueError(f"graphed_greedy_generate: input_ids must be a CUDA tensor [B, S], got "
                         f"{tuple(ids.shape)} on {ids.device}")
    B, S = ids.shape
    dev = ids.device
    from .static_cache import ElasticStaticCache

    # transformers' SDPA path drops its mask for a single query without padding, which over a static cache would
    # attend the empty slots past the sequence: the dense side gets a 2D mask [B, max_cache_len] whose ones end at
    # the current position (set inside the step, so the graph keeps it current). The elastic decode op reads each
    # sample's length from the cache and takes no mask (its mask function would read the mask on the host).
    # That mask is costly on the dense side (transformers 5.x): with a mask, sdpa_attention_forward repeats K/V to the
    # query heads (repeat_kv: use_gqa_in_sdpa needs mask None on CUDA), i.e. writes and reads 4x the cache per layer
    # at Llama-8B's GQA, and SDPA cannot use its flash / cuDNN kernels; dense_mask=False measures the other bound.
    mask = None
    if dense_mask and not isinstance(cache, ElasticStaticCache):
        mask = torch.zeros(B, cache.layers[0].max_cache_len, dtype=torch.long, device=dev)
        mask[:, :S] = 1
    sync = torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    positions = torch.arange(S, device=dev)
    out = model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(B, -1), cache_position=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1]
    tok = first.argmax(-1, keepdim=True)                     # [B, 1] static: the step's input and output
    cur = torch.full((1,), S, dtype=torch.long, device=dev)   # static: the step's cache position
    tokens = torch.empty(B, new_tokens, dtype=torch.long, device=dev)
    tokens[:, 0] = tok[:, 0]
    logits = step_logits = None
    if keep_logits:
        logits = torch.empty(new_tokens, B, first.shape[-1], dtype=torch.float32, device=dev)
        logits[0] = first.float()
        step_logits = torch.empty(B, first.shape[-1], dtype=torch.float32, device=dev)
    del out, first
    sync()
    t1 = time.perf_counter()

    def step():
        if mask is not None:
            mask.index_fill_(1, cur, 1)
        o = model(input_ids=tok, position_ids=cur.view(1, 1).expand(B, 1), cache_position=cur, attention_mask=mask,
                  past_key_values=cache, use_cache=True)
        lg = o.logits[:, -1]
        tok.copy_(lg.argmax(-1, keepdim=True))
        cur.add_(1)
        if keep_logits:
            step_logits.copy_(lg.float())

    def record(i):
        tokens[:, i] = tok[:, 0]
        if keep_logits:
            logits[i] = step_logits

    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for i in range(1, 1 + eager_steps):
            step()
            record(i)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    sync()
    t2 = time.perf_counter()
    for i in range(1 + eager_steps, new_tokens):
        graph.replay()
        record(i)
    sync()
    t3 = time.perf_counter()
    del graph
    return GraphedGeneration(tokens, logits, t1 - t0, t2 - t1, t3 - t2, new_tokens - 1 - eager_steps)
