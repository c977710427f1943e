"""Building blocks of `python -m elastic_cuda demo`, on CPU without the real model: the needle prompt, the
attention timing hook, the found / cost tables and the verdict line, the variants built from the shipped routers,
and the CLI's argument checks. (The real model runs in tests/test_real_model.py, marked slow.)"""
import os
import time

import pytest
import torch

pytest.importorskip("transformers")

from elastic_cuda import demo  # noqa: E402
from elastic_cuda.cli import build_parser, main  # noqa: E402
from elastic_cuda.demo import (AttentionTimer, NeedlePrompt, RunResult, Variant, cost_table, found_key,  # noqa: E402
                               needle_prompt, needle_table, speed_verdict)


class WordTokenizer:
    """A tokenizer stand-in: one token per whitespace-separated word (the space belongs to the word, as in BPE),
    and a chat template like SmolLM2's."""

    def __init__(self):
        self.vocab, self.words = {}, []

    def _id(self, word):
        if word not in self.vocab:
            self.vocab[word] = len(self.words)
            self.words.append(word)
        return self.vocab[word]

    def __call__(self, text, add_special_tokens=False):
        import re
        return {"input_ids": [self._id(w) for w in re.findall(r"\s*\S+|\s+$", text)]}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert not tokenize and add_generation_prompt
        return f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


@pytest.mark.parametrize("length", [200, 777, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_needle_prompt_has_the_length_asked_and_the_needle_at_the_depth_asked(length, depth):
    tok = WordTokenizer()
    p = needle_prompt(tok, length, depth, "12345")
    ids = p.input_ids[0].tolist()
    assert p.input_ids.shape == (1, length) and p.length == length
    assert tok.decode(ids[p.needle_start:p.needle_end]) == " The pass key is 12345. Remember it. 12345 is the pass key."
    assert tok.decode(ids).count("12345") == 2  # the key occurs in the needle only
    assert tok.decode(ids).endswith("<|im_start|>assistant\nThe pass key is")
    head = len(tok(f"<|im_start|>user\n{demo._NEEDLE_INTRO}")["input_ids"])
    tail = len(tok(demo._NEEDLE_QUESTION)["input_ids"]) + len(tok("<|im_end|>\n<|im_start|>assistant\n"
                                                                  "The pass key is")["input_ids"])
    filler = length - head - tail - (p.needle_end - p.needle_start)
    longest_sentence = max(len(tok(" " + s)["input_ids"]) for s in demo._FILLER_SENTENCES)
    # at the sentence boundary nearest the asked depth of the filler
    assert abs((p.needle_start - head) - depth * filler) <= longest_sentence / 2 + 1
    assert p.tokens_after == length - p.needle_end
    if depth == 0.0:
        assert p.needle_start == head
    if depth == 1.0:
        assert p.needle_end == length - tail


def test_needle_prompt_moves_the_needle_monotonically_and_refuses_bad_arguments():
    tok = WordTokenizer()
    starts = [needle_prompt(tok, 1000, d, "55555").needle_start for d in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert starts == sorted(starts) and len(set(starts)) == 5
    with pytest.raises(ValueError, match="depth"):
        needle_prompt(tok, 1000, 1.5, "55555")
    with pytest.raises(ValueError, match="too short"):
        needle_prompt(tok, 40, 0.5, "55555")


def test_found_key_is_a_string_match_of_the_digits():
    assert found_key("60494.", "60494") and found_key("The key is 60494", "60494")
    assert not found_key("6049.", "60494") and not found_key("", "60494")


def _prompt(start, after):
    return NeedlePrompt(torch.zeros(1, start + 10 + after, dtype=torch.long), "11111", start, start + 10)


def test_needle_table_marks_each_variant_and_position():
    prompts = [_prompt(100, 900), _prompt(500, 500)]
    found = {("dense", 0): True, ("dense", 1): True, ("all-sparse", 0): False, ("all-sparse", 1): True,
             ("router", 0): True, ("router", 1): False}
    lines = needle_table(["dense", "all-sparse", "router"], prompts, found, {"all-sparse": 1.0, "router": 0.3})
    assert "100 (900)" in lines[1] and "500 (500)" in lines[1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows == {"dense": ["found", "found", "2/2", "-"], "all-sparse": ["MISS", "found", "1/2", "1.00"],
                    "router": ["found", "MISS", "1/2", "0.30"]}
    with pytest.raises(KeyError):  # a missing run is an error, not a silent "MISS"
        needle_table(["dense", "other"], prompts, found)


def test_speed_verdict_says_slower_when_slower_and_no_clear_difference_when_runs_overlap():
    assert speed_verdict("x", [1.0, 1.1], [2.0, 2.2], "cuda") == "x: attention 2.00x faster than dense on cuda"
    assert speed_verdict("x", [3.0, 3.3, 2.9], [1.0, 1.2, 1.1], "cpu") == "x: attention 2.73x SLOWER than dense on cpu"
    overlap = speed_verdict("x", [0.9, 1.5], [1.0, 2.0], "cpu")
    assert overlap.startswith("x: no clear difference from dense on cpu: the runs overlap (900-1500 ms vs 1000-2000 ms")
    assert overlap.endswith("medians faster by 1.25x)")
    assert "not measurable" in speed_verdict("x", [0.0], [1.0], "cpu")


def _run(attn, prefill, kv, msr=None, esr=None):
    metrics = None if msr is None else {"msr": msr, "esr": esr}
    return RunResult("1", prefill, 0.1, 2, attn, 0.01, metrics, [], kv)


def test_cost_table_reports_medians_means_and_one_verdict_per_elastic_row():
    variants = [Variant("dense"), Variant("router", {"policy": "router"})]
    runs = {("dense", 0): _run(0.010, 1.0, 2**20), ("dense", 1): _run(0.030, 2.0, 2**20),
            ("dense", 2): _run(0.020, 9.0, 2**20),
            ("router", 0): _run(0.005, 1.0, 2**19, 0.5, 0.2), ("router", 1): _run(0.007, 1.0, 2**19, 0.3, 0.4),
            ("router", 2): _run(0.900, 1.0, 2**19, 0.4, 0.3)}
    lines = cost_table(variants, runs, 3, "cpu")
    dense, router = lines[1].split(), lines[2].split()
    assert dense == ["dense", "20", "2000", "-", "-", "1.0"]        # medians: 20 ms attention, 2000 ms prefill
    assert router == ["router", "7", "1000", "0.300", "0.400", "0.5"]  # ESR / MSR: means over the prompts
    assert lines[-1].startswith("router: no clear difference from dense on cpu")  # 900 ms in one run
    runs[("router", 2)] = _run(0.008, 1.0, 2**19, 0.4, 0.3)
    assert cost_table(variants, runs, 3, "cpu")[-1] == "router: attention 2.86x faster than dense on cpu"


def _tiny_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_attention_timer_counts_a_real_models_calls_and_restores_the_function():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _tiny_llama(layers=3)
    model.set_attn_implementation("sdpa")
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ids = torch.randint(3, 64, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits
        with AttentionTimer("sdpa", "cpu") as timer:
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not original
            out = model(ids, use_cache=True)
            model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)  # one decode step
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    assert timer.calls == 6                         # 3 layers x (prefill + decode)
    prefill_s, decode_s = timer.totals()
    assert prefill_s > 0 and decode_s > 0
    assert torch.equal(out.logits, reference)       # timing changes nothing


def test_attention_timer_splits_prefill_and_decode_and_restores_after_an_exception():
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def slow_attention(module, query, key, value, mask, **kwargs):
        time.sleep(0.02 if query.shape[2] > 1 else 0.0)
        return query, None

    AttentionInterface.register("demo_test_attention", slow_attention)
    try:
        q1, q8 = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 8, 4)
        with pytest.raises(RuntimeError, match="boom"):
            with AttentionTimer("demo_test_attention", "cpu") as timer:
                ALL_ATTENTION_FUNCTIONS["demo_test_attention"](None, q8, q8, q8, None)
                ALL_ATTENTION_FUNCTIONS["demo_test_attention"](None, q1, q8, q8, None)
                raise RuntimeError("boom")
        assert ALL_ATTENTION_FUNCTIONS["demo_test_attention"] is slow_attention
        prefill_s, decode_s = timer.totals()
        assert timer.calls == 2 and prefill_s >= 0.02 and decode_s < 0.02
    finally:
        AttentionInterface._global_mapping.pop("demo_test_attention", None)
    with pytest.raises(ValueError, match="no attention function"):
        with AttentionTimer("demo_test_attention", "cpu"):
            pass


def _smollm2_shaped_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=32, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model


def test_build_variants_takes_each_modes_settings_from_its_router_set():
    model = _smollm2_shaped_model()
    variants = demo.build_variants(model, "cpu", ["all_sparse", "router"], ["block", "stream"], window=256)
    assert [v.name for v in variants] == ["dense (HF sdpa)", "BLOCK all-sparse", "BLOCK router",
                                          "STREAM all-sparse", "STREAM router"]
    assert variants[0].enable_kwargs is None
    block, stream = variants[1].enable_kwargs, variants[4].enable_kwargs
    assert (block["sparse_mode"], block["block_size"], block["xattn_stride"]) == ("block", 128, 16)
    assert block["policy"] == "all_sparse" and "routers" not in block
    assert (stream["sparse_mode"], stream["sink"], stream["window"], stream["policy"]) == ("stream", 64, 256, "router")
    assert stream["routers"].config["sparse_mode"] == "stream"
    assert "window 256" in variants[3].sparse_settings
    only = demo.build_variants(model, "cpu", ["router", "fixed"], ["stream"],
                               routers_dir=demo.SHIPPED_ROUTER_DIRS["stream"], sparsity_shift=2.0)
    assert [v.name for v in only] == ["dense (HF sdpa)", "STREAM router shift +2", "STREAM static split"]
    assert only[2].enable_kwargs["fixed_table"].shape == (30, 3)
    relative = os.path.relpath(demo.SHIPPED_ROUTER_DIRS["stream"])  # the shipped set, named as such
    assert demo.build_variants(model, "cpu", ["router"], ["stream"], routers_dir=relative)[1].name == "STREAM router"
    with pytest.raises(ValueError, match="--sparse-modes"):
        demo.build_variants(model, "cpu", ["router"], ["stream"], routers_dir=demo.SHIPPED_ROUTER_DIRS["block"])


def test_cli_demo_arguments():
    args = build_parser().parse_args(["demo", "--context-tokens", "3000", "--depths", "0.2, 0.8",
                                      "--sparse-modes", "stream", "--policies", "router,all_full", "--threads", "1"])
    assert (args.length, args.depths, args.sparse_modes, args.policies) == (3000, [0.2, 0.8], ["stream"],
                                                                            ["router", "all_full"])
    defaults = build_parser().parse_args(["demo"])
    assert defaults.length is None and defaults.depths is None  # per device: demo.DEFAULT_LENGTH / DEFAULT_DEPTHS
    assert defaults.sparse_modes == ["block", "stream"] and defaults.policies == list(demo.DEFAULT_POLICIES)
    for bad in (["--policies", "router,nope"], ["--sparse-modes", ""], ["--depths", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *bad])


def test_cli_demo_refuses_bad_values_in_one_line_before_loading_the_model(tmp_path, monkeypatch, capsys):
    # argparse checks the values (cli_args types), so a bad one ends in one line and exit code 2, and the model is
    # never loaded.
    def must_not_run(args):
        raise AssertionError("run_demo was called")

    monkeypatch.setattr(demo, "run_demo", must_not_run)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [(["--depths", "0.5,1.5"], "--depths"), (["--prompt-file", str(tmp_path / "missing.txt")], "missing.txt"),
             (["--prompt-file", str(empty)], "empty"), (["--max-new-tokens", "0"], "--max-new-tokens")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["demo", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], (argv, err)


def test_cli_demo_turns_a_late_value_error_into_one_line(monkeypatch, capsys):
    def bad_length(args):
        raise ValueError("--length must be in [256, 8185], got 9000")

    monkeypatch.setattr(demo, "run_demo", bad_length)
    assert main(["demo", "--length", "9000"]) == 2
    assert capsys.readouterr().err == "elastic_cuda demo: error: --length must be in [256, 8185], got 9000\n"


def test_shipped_router_dirs_exist():
    for mode, directory in demo.SHIPPED_ROUTER_DIRS.items():
        assert os.path.isfile(os.path.join(directory, "router_config.json")), mode


def test_duo_style_fixed_table():
    table = demo.duo_style_fixed_table(30, 3)
    assert table.shape == (30, 3) and int(table.sum()) == 39  # 39 of 90 KV heads sparse (MSR 0.433)
    assert not table[:2].any() and not table[-2:].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_timer_on_cuda_times_with_events_and_restores():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: not always the current device
    model = _tiny_llama(layers=2).to(device)
    model.set_attn_implementation("sdpa")
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ids = torch.randint(3, 64, (2, 100), device=device)
    with torch.no_grad(), AttentionTimer("sdpa", device) as timer:
        out = model(ids, use_cache=True)
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    prefill_s, decode_s = timer.totals()
    assert timer.calls == 4 and prefill_s > 0 and decode_s > 0
    assert prefill_s < 5 and decode_s < 5  # seconds, not milliseconds
