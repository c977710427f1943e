"""The `python -m elastic_cuda demo` run: what routing buys on SmolLM2-135M-Instruct.

A 5-digit pass key (the needle) is hidden at several depths of a long prompt, far from its end: outside the STREAM
window and away from the diagonal blocks a BLOCK head always keeps. Each prompt runs with dense attention (HF
sdpa) and, per sparse mode (BLOCK, STREAM), with every KV head sparse and with the shipped routers. The output is
a found / missed table per needle depth, then the cost side: attention time measured on its own (an opt-in
timing hook around the attention function transformers calls), ESR, MSR and the KV cache held.
"""
from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from .integrations.generate import greedy_generate, static_cache_for
from .integrations.transformers import disable, enable
from .router import RouterSet

_ROUTERS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "routers")
# The shipped router set of each sparse mode; BLOCK is the default set (dense-level retrieval accuracy).
SHIPPED_ROUTER_DIRS = {"block": os.path.join(_ROUTERS_ROOT, "smollm2-135m-instruct"),
                       "stream": os.path.join(_ROUTERS_ROOT, "smollm2-135m-instruct-stream")}
SHIPPED_ROUTERS = SHIPPED_ROUTER_DIRS["block"]

MSR_DEFINITION = "MSR = fraction of KV heads the router sends to the sparse mode (0: all FULL, 1: all sparse)"
ESR_DEFINITION = "ESR = fraction of causal (query, key) pairs the masks skip: the attention work not done"

POLICY_CHOICES = ("all_sparse", "router", "all_full", "fixed")
DEFAULT_POLICIES = ("all_sparse", "router")
SPARSE_MODE_CHOICES = ("block", "stream")
# Per device type. CPU (fp32): 4K tokens, where every-head-sparse loses the needle in both sparse modes at the
# early depths (2K is too short for BLOCK: its estimate still keeps the needle's block) and the default run stays
# near 4 min on 2 cores. GPU: 8000 tokens, nearly the model's 8K, where sparse attention has the most work to skip.
DEFAULT_LENGTH = {"cpu": 4096, "cuda": 8000}
MIN_LENGTH = 256  # the filler must hold the needle far from both ends
DEFAULT_DEPTHS = {"cpu": (0.1, 0.3, 0.5, 0.7), "cuda": (0.1, 0.3, 0.5, 0.7, 0.9)}

_FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                     "There and back again.")
_NEEDLE_INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it."
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_NEEDLE_QUESTION = "\nWhat is the pass key? Answer with the 5-digit number only."
# The assistant turn starts with this, so a 5-digit answer needs ~7 greedy tokens whatever the model's phrasing.
_ANSWER_PREFIX = "The pass key is"
NEEDLE_NEW_TOKENS = 7

_SUMMARY_TEXT = (
    "The town of Harrowmere draws its drinking water from a single reservoir built in 1931. For most of the "
    "twentieth century the reservoir was large enough, but the population has tripled since 1980 and three dry "
    "summers in a row have left it at less than half of its capacity each September. The council studied three "
    "options last year. The first was to raise the dam by four metres, which would add about a third to the "
    "storage but would flood a protected wetland and cost an estimated 48 million pounds. The second was to build "
    "a pipeline to the river Lune, twenty kilometres away, which could supply a steady flow in all seasons but "
    "would need pumping stations that use a great deal of electricity. The third was to fix the ageing network of "
    "pipes, which engineers believe loses a quarter of all treated water through leaks, and to give every "
    "household a meter so that people pay for what they use. The engineers' report found that repairing leaks "
    "was the cheapest way to gain water, at roughly a fifth of the cost of the pipeline per litre saved, and "
    "that metering in other towns had cut demand by ten to fifteen percent. Residents at public meetings worried "
    "that meters would hurt large families on low incomes, so the council proposed a free allowance per person. "
    "In March the council voted to start the leak repair programme at once, to introduce meters over five years "
    "with the free allowance, and to keep the pipeline as a fallback plan to be reviewed in 2030 if the reservoir "
    "still falls below forty percent in late summer. The dam option was dropped because of the wetland.")


def chat_prompt(tokenizer, user_text: str) -> torch.Tensor:
    """input_ids [1, S] of one user turn with the model's chat template and the assistant prefix."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids


def summary_prompt(tokenizer, text: str | None = None) -> torch.Tensor:
    body = _SUMMARY_TEXT if text is None else text
    return chat_prompt(tokenizer, "Summarise the following report in two sentences.\n\n" + body)


@dataclass(frozen=True)
class NeedlePrompt:
    input_ids: torch.Tensor  # [1, length]
    key: str                 # the 5-digit pass key
    needle_start: int        # token index of the needle's first token
    needle_end: int          # one past its last token

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def tokens_after(self) -> int:
        """Tokens between the needle and the end of the prompt (what a STREAM window would have to cover)."""
        return self.length - self.needle_end


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def needle_prompt(tokenizer, length: int, depth: float, key: str) -> NeedlePrompt:
    """A chat prompt of exactly `length` tokens: instruction, filler sentences with the needle (the pass key
    sentence) starting at the sentence boundary nearest `depth` of the filler (0: right after the instruction,
    1: right before the question), the question, and the assistant turn opened with "The pass key is"."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle_prompt: depth must be in [0, 1], got {depth!r}")
    marker = "\x00USER\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
    before, after = rendered.split(marker)
    head = _ids(tokenizer, before + _NEEDLE_INTRO)
    needle = _ids(tokenizer, _NEEDLE.format(key=key))
    tail = _ids(tokenizer, _NEEDLE_QUESTION) + _ids(tokenizer, after + _ANSWER_PREFIX)
    budget = length - len(head) - len(needle) - len(tail)
    sentences = [_ids(tokenizer, " " + s) for s in _FILLER_SENTENCES]
    if budget < 2 * max(len(s) for s in sentences):
        raise ValueError(f"needle_prompt: length {length} is too short; the instruction, needle and question alone "
                         f"take {length - budget} tokens")
    filler, boundaries, i = [], [0], 0
    while len(filler) < budget:
        filler += sentences[i % len(sentences)]
        boundaries.append(len(filler))
        i += 1
    filler = filler[:budget]  # the last sentence, just before the question, may be cut short
    boundaries = [b for b in boundaries if b < budget] + [budget]  # the end of the (cut) filler is one too
    cut = min(boundaries, key=lambda b: abs(b - depth * budget))
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    start = len(head) + cut
    return NeedlePrompt(torch.tensor([ids], dtype=torch.long), key, start, start + len(needle))


def duo_style_fixed_table(num_layers: int, num_kv_heads: int, edge_layers: int = 2) -> torch.Tensor:
    """Static split in the spirit of DuoAttention: the first and last `edge_layers` layers stay FULL (they
    carry most long-range retrieval in small LMs), the middle layers alternate FULL / STREAM heads
    (head h of layer l streams iff (l + h) is even). Returns bool [L, Hkv], True = sparse."""
    table = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
    for layer in range(edge_layers, num_layers - edge_layers):
        for head in range(num_kv_heads):
            table[layer, head] = (layer + head) % 2 == 0
    return table


class AttentionTimer:
    """Opt-in timing hook: while entered, the attention function transformers calls for `implementation`
    ("sdpa", "elastic", ...) is wrapped, and the time of each call is added to `prefill_s` (calls with more than
    one query) or `decode_s` (one query). CUDA: events around each call, read once in totals() (no sync per call);
    CPU: perf_counter. The function registered before entering is restored on exit, also after an exception.
    For "elastic" the time includes routing and the BLOCK mask estimate: they are part of its attention cost."""

    def __init__(self, implementation: str, device):
        self.implementation = implementation
        self.cuda = torch.device(device).type == "cuda"
        self.calls = 0
        self._original = None
        self._events = []          # CUDA: (is_prefill, start event, end event)
        self._cpu = [0.0, 0.0]     # CPU: prefill s, decode s

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.implementation not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"AttentionTimer: no attention function registered as {self.implementation!r}")
        self._original = ALL_ATTENTION_FUNCTIONS[self.implementation]
        wrapper = self._timed  # one bound-method object, so the identity check below holds
        AttentionInterface.register(self.implementation, wrapper)
        if ALL_ATTENTION_FUNCTIONS[self.implementation] is not wrapper:  # a local override would bypass us
            AttentionInterface.register(self.implementation, self._original)
            raise RuntimeError(f"AttentionTimer: {self.implementation!r} is overridden locally; cannot time it")
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        AttentionInterface.register(self.implementation, self._original)
        return False

    def _timed(self, module, query, *args, **kwargs):
        self.calls += 1
        prefill = query.shape[2] > 1
        if self.cuda:
            stream = torch.cuda.current_stream(query.device)  # the query's device, not necessarily the current one
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = self._original(module, query, *args, **kwargs)
            end.record(stream)
            self._events.append((prefill, start, end))
            return out
        t0 = time.perf_counter()
        out = self._original(module, query, *args, **kwargs)
        self._cpu[0 if prefill else 1] += time.perf_counter() - t0
        return out

    def totals(self) -> tuple[float, float]:
        """(prefill s, decode s) summed over the calls so far."""
        if not self.cuda:
            return self._cpu[0], self._cpu[1]
        sums = [0.0, 0.0]
        for prefill, start, end in self._events:
            end.synchronize()  # waits on the event's own device (the current device may be another GPU)
            sums[0 if prefill else 1] += start.elapsed_time(end) / 1e3
        return sums[0], sums[1]


@dataclass
class Variant:
    name: str
    enable_kwargs: dict | None = None  # None: the model's own dense attention (HF sdpa)
    sparse_settings: str = ""          # what a sparse head runs, for the log


@dataclass
class RunResult:
    answer: str
    prefill_s: float
    decode_s: float
    new_tokens: int
    attn_prefill_s: float
    attn_decode_s: float
    metrics: dict | None = None
    routing_map: list = field(default_factory=list)
    kv_bytes: int = 0


def _cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def run_variant(model, tokenizer, variant: Variant, input_ids, max_new_tokens, warmup_ids=None) -> RunResult:
    """One greedy generation under `variant`, attention timed by AttentionTimer. warmup_ids: an untimed prefill
    first (the first call of a path pays one-off costs: kernel loads, library handles, cuDNN plans)."""
    from transformers import DynamicCache

    from .integrations.cache import ElasticCache

    device = next(model.parameters()).device
    state = enable(model, **variant.enable_kwargs) if variant.enable_kwargs is not None else None
    try:
        def new_cache(tokens):
            # On a GPU the elastic variants decode over ElasticStaticCache (the decode op, STREAM heads keep sink +
            # window in a ring); elsewhere over ElasticCache. (Created last: the model's elastic state follows the
            # newest cache.)
            if state is None:
                return DynamicCache()
            return static_cache_for(model, tokens + max_new_tokens + 1) or ElasticCache(model)

        if warmup_ids is not None:
            with torch.no_grad():
                model(input_ids=warmup_ids.to(device), use_cache=True,
                      past_key_values=new_cache(int(torch.as_tensor(warmup_ids).numel())))
        cache = new_cache(int(torch.as_tensor(input_ids).numel()))
        with AttentionTimer(model.config._attn_implementation, device) as timer:
            gen = greedy_generate(model, input_ids, max_new_tokens, tokenizer.eos_token_id, cache=cache,
                                  keep_stop=True)
            new, prefill_s, decode_s = gen.tokens, gen.prefill_s, gen.decode_s
        if timer.calls == 0:
            raise RuntimeError(f"demo: the timing hook saw no attention call ({model.config._attn_implementation})")
        attn_prefill_s, attn_decode_s = timer.totals()
        metrics = state.metrics() if state is not None else None
        rmap = state.routing_map() if state is not None else []
    finally:
        if state is not None:
            disable(model)
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    return RunResult(answer, prefill_s, decode_s, len(new), attn_prefill_s, attn_decode_s, metrics, rmap,
                     _cache_bytes(cache))


def sparse_settings(sparse_mode: str, cfg: dict) -> str:
    """What a sparse head runs, for the log. cfg: sink/window or block_size/xattn_stride/xattn_threshold."""
    if sparse_mode == "block":
        return (f"BLOCK block {cfg['block_size']}, XAttention stride {cfg['xattn_stride']}, threshold "
                f"{cfg['xattn_threshold']:g}; decode dense")
    return f"STREAM sink {cfg['sink']}, window {cfg['window']}"


def build_variants(model, device, policies, sparse_modes, routers_dir=None, sink=None, window=None,
                   sparsity_shift=0.0) -> list[Variant]:
    """dense first, then per sparse mode one row per policy. Each mode's settings (sink/window, block size,
    XAttention stride/threshold) come from its router set; routers_dir replaces the shipped set of its own mode;
    sink / window override the STREAM settings."""
    sets = {mode: (SHIPPED_ROUTER_DIRS[mode], None) for mode in sparse_modes}
    if routers_dir is not None:
        own = RouterSet.load(routers_dir, model=model, map_location=device)
        mode = own.config["sparse_mode"]
        if mode not in sets:
            raise ValueError(f"--routers {routers_dir} routes to {mode} heads, but --sparse-modes is "
                             f"{','.join(sparse_modes)}")
        sets[mode] = (routers_dir, own)
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    variants = [Variant("dense (HF sdpa)")]
    for mode, (directory, routers) in sets.items():
        if routers is None:
            routers = RouterSet.load(directory, model=model, map_location=device)
        cfg = dict(routers.config)
        if mode == "stream":
            cfg["sink"] = cfg["sink"] if sink is None else sink
            cfg["window"] = cfg["window"] if window is None else window
        common = {"sparse_mode": mode, "sink": cfg["sink"], "window": cfg["window"],
                  "block_size": cfg.get("block_size"), "xattn_stride": cfg.get("xattn_stride"),
                  "xattn_threshold": cfg.get("xattn_threshold")}
        for policy in policies:
            kw = {**common, "policy": policy}
            if policy == "router":
                kw.update(routers=routers, sparsity_shift=sparsity_shift)
                shipped = os.path.realpath(directory) == os.path.realpath(SHIPPED_ROUTER_DIRS[mode])
                name = f"{mode.upper()} router" + ("" if shipped else f" ({directory})")
                if sparsity_shift:
                    name += f" shift {sparsity_shift:+g}"
            elif policy == "fixed":
                kw["fixed_table"] = duo_style_fixed_table(L, Hkv)
                name = f"{mode.upper()} static split"
            else:
                name = f"{mode.upper()} {policy.replace('_', '-')}"
            variants.append(Variant(name, kw, sparse_settings(mode, cfg)))
    return variants


def found_key(answer: str, key: str) -> bool:
    """The pass key counts as found iff its 5 digits occur in the answer (RULER's string match)."""
    return key in answer


def needle_table(names: list[str], prompts: list[NeedlePrompt], found: dict, msr: dict | None = None) -> list[str]:
    """Rows: variants; columns: needle positions; found[(name, column)] -> bool; then found / total and, where
    msr[name] is given, the row's mean MSR."""
    heads = [f"{p.needle_start} ({p.tokens_after})" for p in prompts]
    width = max(len(n) for n in names) + 2
    cols = [max(len(h), 5) + 2 for h in heads]
    lines = ["needle at token (tokens after it)".rjust(width + sum(cols)),
             "variant".ljust(width) + "".join(h.rjust(c) for h, c in zip(heads, cols)) + "   found    MSR"]
    for name in names:
        marks = [found[(name, j)] for j in range(len(prompts))]
        cells = "".join(("found" if m else "MISS").rjust(c) for m, c in zip(marks, cols))
        routed = f"{msr[name]:7.2f}" if msr and name in msr else "      -"
        lines.append(name.ljust(width) + cells + f"   {f'{sum(marks)}/{len(marks)}':5}" + routed)
    return lines


def speed_verdict(name: str, seconds: list[float], dense_seconds: list[float], device_type: str) -> str:
    """One honest line comparing an elastic row's attention times (one per prompt) with dense attention's on this
    device: the ratio of the medians, called faster / SLOWER only when every run of one is below every run of
    the other; overlapping runs (a noisy or shared machine) are reported as no clear difference."""
    if min(seconds + dense_seconds, default=0.0) <= 0:
        return f"{name}: attention time not measurable here"
    ratio = _median(dense_seconds) / _median(seconds)
    if max(seconds) < min(dense_seconds):
        return f"{name}: attention {ratio:.2f}x faster than dense on {device_type}"
    if min(seconds) > max(dense_seconds):
        return f"{name}: attention {1 / ratio:.2f}x SLOWER than dense on {device_type}"
    return (f"{name}: no clear difference from dense on {device_type}: the runs overlap ({min(seconds) * 1e3:.0f}-"
            f"{max(seconds) * 1e3:.0f} ms vs {min(dense_seconds) * 1e3:.0f}-{max(dense_seconds) * 1e3:.0f} ms; "
            f"medians {'faster' if ratio >= 1 else 'slower'} by {max(ratio, 1 / ratio):.2f}x)")


def _median(values):
    return statistics.median(values) if values else float("nan")


def cost_table(variants: list[Variant], runs: dict, n_prompts: int, device_type: str) -> list[str]:
    """Per variant, medians over the needle prompts: attention time at prefill, whole prefill, ESR, MSR, KV cache;
    then one speed line per elastic variant."""
    name_w = max(len(v.name) for v in variants) + 2
    lines = ["variant".ljust(name_w) + "attn prefill ms  prefill ms   ESR    MSR   KV cache MiB"]
    attn = {}
    for v in variants:
        rs = [runs[(v.name, j)] for j in range(n_prompts)]
        attn[v.name] = [r.attn_prefill_s for r in rs]
        msr = esr = "-"
        if rs[0].metrics is not None:
            esr = f"{statistics.mean(r.metrics['esr'] for r in rs):.3f}"
            msr = f"{statistics.mean(r.metrics['msr'] for r in rs):.3f}"
        lines.append(v.name.ljust(name_w) + f"{_median(attn[v.name]) * 1e3:15.0f}"
                     + f"{_median([r.prefill_s for r in rs]) * 1e3:12.0f}" + f"{esr:>7}{msr:>7}"
                     + f"{_median([r.kv_bytes for r in rs]) / 2**20:15.1f}")
    dense = variants[0].name
    lines.append("")
    lines += [speed_verdict(v.name, attn[v.name], attn[dense], device_type) for v in variants[1:]]
    return lines


def format_routing_map(rmap: list, per_line: int = 10) -> str:
    cells = [f"L{i:02d} {row}" for i, row in enumerate(rmap)]
    return "\n".join("  " + "  ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line))


def run_demo(args, log=print):
    from .integrations.smollm2 import load_smollm2

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    log(f"loading SmolLM2-135M-Instruct on {device} ({dtype}) ...")
    model, tokenizer = load_smollm2(device=device, dtype=dtype, attn_implementation="sdpa")
    length = args.length or DEFAULT_LENGTH["cuda" if device.type == "cuda" else "cpu"]
    depths = args.depths or DEFAULT_DEPTHS["cuda" if device.type == "cuda" else "cpu"]
    max_len = model.config.max_position_embeddings - NEEDLE_NEW_TOKENS
    if not MIN_LENGTH <= length <= max_len:
        raise ValueError(f"--length must be in [{MIN_LENGTH}, {max_len}] (the model's "
                         f"{model.config.max_position_embeddings} positions minus {NEEDLE_NEW_TOKENS} answer tokens), "
                         f"got {length}")
    variants = build_variants(model, device, args.policies, args.sparse_modes, args.routers, args.sink,
                              args.window, args.sparsity_shift)
    prompts = [needle_prompt(tokenizer, length, d, str(rng.randint(10000, 99999))) for d in depths]
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    log(f"  loaded in {time.perf_counter() - t_start:.1f} s{threads}")
    log(f"\n{MSR_DEFINITION}\n{ESR_DEFINITION}")
    log("sparse heads run:")
    for settings in dict.fromkeys(v.sparse_settings for v in variants[1:]):
        log(f"  {settings}")

    log(f"\n=== pass key: a 5-digit key hidden at {len(prompts)} depths of a {length}-token prompt "
        f"(keys from --seed {args.seed}); greedy answer after 'The pass key is'")
    runs = {}
    jobs = [(j, v) for j in range(len(prompts)) for v in variants]  # interleaved: load drift hits every row alike
    for n, (j, v) in enumerate(jobs):
        warm = None
        if j == 0:  # full length on a GPU (shape-specific plans), a short prompt on CPU (only one-off loads matter)
            warm = prompts[0].input_ids if device.type == "cuda" else prompts[0].input_ids[:, -256:]
        t = time.perf_counter()
        runs[(v.name, j)] = run_variant(model, tokenizer, v, prompts[j].input_ids, NEEDLE_NEW_TOKENS, warm)
        log(f"  [{n + 1}/{len(jobs)}] {v.name}, needle at {prompts[j].needle_start}: "
            f"'{runs[(v.name, j)].answer}' ({time.perf_counter() - t:.1f} s)")
    found = {(v.name, j): found_key(runs[(v.name, j)].answer, prompts[j].key)
             for v in variants for j in range(len(prompts))}
    msr = {v.name: statistics.mean(runs[(v.name, j)].metrics["msr"] for j in range(len(prompts)))
           for v in variants if v.enable_kwargs is not None}
    log("")
    for line in needle_table([v.name for v in variants], prompts, found, msr):
        log(line)
    modes = {v.enable_kwargs["sparse_mode"]: v.enable_kwargs for v in variants[1:]}
    if "stream" in modes:
        sink, window = modes["stream"]["sink"], modes["stream"]["window"]
        log(f"STREAM heads see only the first {sink} and the last {window} tokens: a needle further back is lost "
            "unless the heads that retrieve it stay FULL.")
        seen = [p.needle_start for p in prompts if p.tokens_after < window or p.needle_end <= sink]
        if seen:
            log(f"note: the needle at token(s) {seen} is inside the STREAM sink or window: STREAM heads see it there")
    if "block" in modes:
        log("BLOCK heads keep the key blocks the XAttention estimate finds important for each query block, which "
            "can include the needle's block even when every head is sparse.")

    plural = "s" if len(prompts) > 1 else ""
    log(f"\n=== cost at prefill ({length} tokens; medians over the {len(prompts)} prompt{plural})\n"
        "attention time: summed over the layers' attention calls, routing and BLOCK mask estimate included"
        + ("; on CUDA the elastic rows' calls also write the prompt into their static KV cache (dense's cache "
           "update runs outside its call)" if device.type == "cuda" else "")
        + "; prefill: the whole prompt forward, after an untimed warm-up prefill for every row; ESR and MSR: means")
    for line in cost_table(variants, runs, len(prompts), device.type):
        log(line)
    if any(v.enable_kwargs and v.enable_kwargs["sparse_mode"] == "block" for v in variants):
        log("(BLOCK heads keep their whole KV cache: their masks cover the prefill and decode runs them densely; "
            "STREAM heads keep sink + window)")
    for v in variants:
        if v.enable_kwargs and v.enable_kwargs["policy"] == "router":
            log(f"\nrouting map of '{v.name}' on the first prompt (rows: layers, one character per KV head; "
                "F full, S stream, B block):")
            log(format_routing_map(runs[(v.name, 0)].routing_map))

    second = [v for v in variants if v.enable_kwargs is None or v.enable_kwargs["policy"] == "router"]
    if args.prompt_file:
        with open(args.prompt_file) as f:
            ids, title = chat_prompt(tokenizer, f.read()), f"your prompt ({args.prompt_file})"
    else:
        ids, title = summary_prompt(tokenizer), "summarisation, no retrieval needed: how sparse do the routers go?"
    log(f"\n=== {title} ({ids.shape[1]} tokens, {args.max_new_tokens} new tokens)")
    for v in second:
        r = run_variant(model, tokenizer, v, ids, args.max_new_tokens, ids if device.type == "cuda" else None)
        routed = "" if r.metrics is None else f", MSR {r.metrics['msr']:.3f}, ESR {r.metrics['esr']:.3f}"
        log(f"--- {v.name}{routed}: " + r.answer.replace("\n", " ")[:400])
    log(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return runs
