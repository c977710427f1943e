"""The `python -m elastic_cuda demo` run: SmolLM2-135M-Instruct answering a pass-key prompt and a
summarisation prompt with dense attention (HF sdpa), the elastic op with every head FULL, and the
elastic op under a routing policy; prints answers, the routing map, MSR/ESR and timings."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import torch

from .router import RouterSet
from .integrations.generate import greedy_generate
from .integrations.transformers import disable, enable

SHIPPED_ROUTERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "routers",
                               "smollm2-135m-instruct")

_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")

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


def passkey_prompt(tokenizer, context_tokens: int, rng: random.Random):
    """(input_ids, key): a random 5-digit key hidden at a random depth in ~context_tokens tokens of filler."""
    key = str(rng.randint(10000, 99999))
    filler_tokens = max(len(tokenizer(_FILLER)["input_ids"]), 1)
    repeats = max(context_tokens // filler_tokens, 2)
    depth = rng.randint(repeats // 10, repeats - repeats // 10 - 1)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
            + _FILLER * depth + needle + _FILLER * (repeats - depth)
            + "\nWhat is the pass key? Answer with the 5-digit number only.")
    return chat_prompt(tokenizer, text), key


def summary_prompt(tokenizer, text: str | None = None) -> torch.Tensor:
    body = _SUMMARY_TEXT if text is None else text
    return chat_prompt(tokenizer, "Summarise the following report in two sentences.\n\n" + body)


def duo_style_fixed_table(num_layers: int, num_kv_heads: int, edge_layers: int = 2) -> torch.Tensor:
    """Static split in the spirit of DuoAttention: the first and last `edge_layers` layers stay FULL (they
    carry most long-range retrieval in small LMs), the middle layers alternate FULL / STREAM heads
    (head h of layer l streams iff (l + h) is even). Returns bool [L, Hkv], True = sparse."""
    table = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
    for layer in range(edge_layers, num_layers - edge_layers):
        for head in range(num_kv_heads):
            table[layer, head] = (layer + head) % 2 == 0
    return table


@dataclass
class RunResult:
    name: str
    answer: str
    prefill_s: float
    decode_s: float
    new_tokens: int
    metrics: dict | None = None
    routing_map: list = field(default_factory=list)
    sparse_settings: str = ""  # what a sparse head ran, e.g. "STREAM sink 64, window 512"
    kv_bytes: int = 0          # KV cache held at the end (ElasticCache for elastic runs)
    kv_dense_bytes: int = 0    # what a plain dynamic cache holds for the same tokens


def run_variant(model, tokenizer, name, input_ids, max_new_tokens, enable_kwargs=None,
                warmup: bool = True) -> RunResult:
    """One generation; enable_kwargs None = the model's own dense attention (HF sdpa). warmup: one untimed
    prefill of the same prompt first, so the timings are not first-call costs."""
    from .integrations.cache import ElasticCache

    state = enable(model, **enable_kwargs) if enable_kwargs is not None else None
    try:
        if warmup:  # the first call of a path pays one-off costs (kernel loads, library handles): time the second
            from transformers import DynamicCache

            with torch.no_grad():
                model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=True,
                      past_key_values=ElasticCache(model) if state is not None else DynamicCache())
        cache = ElasticCache(model) if state is not None else None
        gen = greedy_generate(model, input_ids, max_new_tokens, tokenizer.eos_token_id, cache=cache, keep_stop=True)
        new, prefill_s, decode_s = gen.tokens, gen.prefill_s, gen.decode_s
        kv = (cache.memory_bytes(), cache.dense_memory_bytes()) if cache is not None else (0, 0)
        metrics = state.metrics() if state is not None else None
        rmap = state.routing_map() if state is not None else []
        settings = sparse_settings(state) if state is not None else ""
    finally:
        if state is not None:
            disable(model)
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    return RunResult(name, answer, prefill_s, decode_s, len(new), metrics, rmap, settings, *kv)


def sparse_settings(state) -> str:
    """What a sparse head of this ElasticState runs, for the log line."""
    if state.sparse_mode == "block":
        return (f"BLOCK block {state.block_size}, xattn stride {state.xattn_stride}, "
                f"threshold {state.xattn_threshold:g}; decode dense")
    return f"STREAM sink {state.sink}, window {state.window}"


def format_routing_map(rmap: list, per_line: int = 10) -> str:
    cells = [f"L{i:02d} {row}" for i, row in enumerate(rmap)]
    return "\n".join("  " + "  ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line))


def resolve_policy(policy: str | None, routers_dir: str | None):
    """(policy, routers_dir): the default is 'router' when trained routers are shipped, else 'fixed'."""
    if routers_dir is None and os.path.isfile(os.path.join(SHIPPED_ROUTERS, "router_config.json")):
        routers_dir = SHIPPED_ROUTERS
    if policy is None:
        policy = "router" if routers_dir is not None else "fixed"
    if policy == "router" and routers_dir is None:
        raise ValueError("--policy router needs --routers DIR (no trained routers are shipped in "
                         f"{SHIPPED_ROUTERS})")
    return policy, routers_dir


def run_demo(args, log=print):
    from tqdm.auto import tqdm

    from .integrations.smollm2 import load_smollm2

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy, routers_dir = resolve_policy(args.policy, args.routers)
    log(f"loading SmolLM2-135M-Instruct on {device} ({dtype}) ...")
    t = time.perf_counter()
    model, tokenizer = load_smollm2(device=device, dtype=dtype, attn_implementation="sdpa")
    log(f"  loaded in {time.perf_counter() - t:.1f} s")
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads

    elastic_kw = dict(policy=policy, sink=args.sink, window=args.window)
    if policy == "router":
        # sink/window None: the routers' own settings (they were trained with them).
        elastic_kw["routers"] = RouterSet.load(routers_dir, model=model, map_location=device)
        elastic_kw["sparsity_shift"] = getattr(args, "sparsity_shift", 0.0)
    elif policy == "fixed":
        elastic_kw["fixed_table"] = duo_style_fixed_table(L, Hkv)
    policy_label = f"elastic {policy}" + (f" ({routers_dir})" if policy == "router" else "")
    if policy == "router" and elastic_kw["sparsity_shift"]:
        policy_label += f" shift {elastic_kw['sparsity_shift']:+g}"

    pk_ids, key = passkey_prompt(tokenizer, args.context_tokens, rng)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            second_ids, second_name = chat_prompt(tokenizer, f.read()), f"prompt file {args.prompt_file}"
    else:
        second_ids, second_name = summary_prompt(tokenizer), "summarisation"
    prompts = [(f"pass key ({pk_ids.shape[1]} tokens, key {key})", pk_ids, key),
               (f"{second_name} ({second_ids.shape[1]} tokens)", second_ids, None)]
    variants = [("dense (HF sdpa)", None), ("elastic all_full", dict(policy="all_full", sink=args.sink,
                                                                     window=args.window)),
                (policy_label, elastic_kw)]
    jobs = [(p, v) for p in prompts for v in variants]
    results = {}
    for (pname, ids, _), (vname, kw) in tqdm(jobs, desc="generating", unit="run"):
        results[(pname, vname)] = run_variant(model, tokenizer, vname, ids, args.max_new_tokens, kw)

    for pname, ids, pkey in prompts:
        log(f"\n=== {pname}")
        for vname, _ in variants:
            r = results[(pname, vname)]
            found = "" if pkey is None else (" [pass key FOUND]" if pkey in r.answer else " [pass key MISSED]")
            tok_s = (r.new_tokens - 1) / r.decode_s if r.decode_s > 0 and r.new_tokens > 1 else float("nan")
            log(f"--- {vname}: prefill {r.prefill_s * 1e3:.0f} ms, decode {r.new_tokens} tokens in "
                f"{r.decode_s * 1e3:.0f} ms ({tok_s:.1f} tok/s){found}")
            if r.metrics is not None:
                m = r.metrics
                log(f"    MSR {m['msr']:.3f}  ESR {m['esr']:.3f}  ({r.sparse_settings}); "
                    f"KV cache {r.kv_bytes / 2**20:.1f} MiB vs {r.kv_dense_bytes / 2**20:.1f} MiB dense")
            log("    answer: " + r.answer.replace("\n", " ")[:400])
        r = results[(pname, policy_label)]
        log(f"routing map of '{policy_label}' (rows: layers, one character per KV head; F full, S stream, "
            "B block):")
        log(format_routing_map(r.routing_map))
    return results

