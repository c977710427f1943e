"""Greedy decoding with a KV cache, the one loop the demo and the eval share, and the tokens that end a turn.

transformers' own `generate` would do, but the callers need what it does not give: the elastic state's metrics
right after the prefill (before decode steps add their pairs to the ESR), and the prefill and decode times apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["Generation", "greedy_generate", "stop_token_ids"]


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
