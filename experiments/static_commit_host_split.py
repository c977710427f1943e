"""Where the host time of an ElasticStaticCache prefill goes (issue #15, the demo's prefill): the SmolLM2-135M shape
(random weights, bf16, B 1, 8K tokens, experiments/profile_prefill_smollm2.py's model and variants) with the cache's
commit methods wrapped in perf_counter: ElasticStaticCache.stage_commit (a layer's stage plus the previous layer's
finish), the layer's stage / finish, pool and table allocation, the lazy initialisation, the commit op, and the
event wait; plus the forward's host time and wall time. Mean ms per prefill over 5 prefills after 3 warm-ups.

`<variant>+static+deferred` finishes every layer's commit at the last layer instead of one layer later (the
alternative the pipelined commit was chosen over): the host then waits for the GPU once and does every layer's
commit while the GPU idles.

usage: python -m experiments.static_commit_host_split   (a CUDA device; prints one dict per variant)"""
import collections
import time

import torch

import elastic_cuda.integrations.static_cache as sc
from elastic_cuda.integrations.transformers import disable, enable
from experiments.profile_prefill_smollm2 import _cache_kw, smollm2_random, variants

ACC = collections.defaultdict(float)
REPS, WARMUP = 8, 3


def timed(owner, name, key):
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            ACC[key] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def deferred_stage_commit(self, layer, head_mode, padding, *, sink, window):
    layer.stage_commit(head_mode, padding, sink=sink, window=window)
    self._staged_layers.append(layer)
    if layer is self.layers[-1]:
        for other in self._staged_layers:
            other.finish_commit()
        self._staged_layers = []


def main():
    timed(sc.ElasticStaticCache, "stage_commit", "cache.stage_commit (total)")
    for name, key in (("finish_commit", "layer.finish_commit"), ("stage_commit", "layer.stage_commit"),
                      ("_ensure_pools", "_ensure_pools"), ("_ensure_tables", "_ensure_tables"),
                      ("lazy_initialization", "lazy_initialization"), ("update", "layer.update")):
        timed(sc.ElasticStaticLayer, name, key)
    timed(torch.cuda.Event, "synchronize", "event.synchronize")
    timed(sc, "static_cache_commit", "commit op")
    pipelined = sc.ElasticStaticCache.stage_commit
    model = smollm2_random()
    all_variants = variants(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 8192), device="cuda")
    for name in ("all_full", "all_full+static", "all_full+static+deferred", "stream_router_fused+static",
                 "stream_router_fused+static+deferred", "all_full", "all_full+static"):
        sc.ElasticStaticCache.stage_commit = deferred_stage_commit if name.endswith("+deferred") else pipelined
        cache_name = name.removesuffix("+deferred")
        enable(model, **all_variants[cache_name.removesuffix("+static")])
        for rep in range(REPS):
            kw = _cache_kw(model, ids, cache_name)
            torch.cuda.synchronize()
            if rep == WARMUP:
                ACC.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(ids, logits_to_keep=1, **kw)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if rep >= WARMUP:
                ACC["forward host"] += t1 - t0
                ACC["forward wall"] += time.perf_counter() - t0
        disable(model)
        print(name, {k: round(v / (REPS - WARMUP) * 1e3, 2) for k, v in sorted(ACC.items())}, flush=True)
        ACC.clear()


if __name__ == "__main__":
    main()
