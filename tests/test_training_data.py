"""Router-training data builder: determinism, answers present, lengths, needle placement, held-out split."""
import random
import re

import pytest

from elastic_cuda.training.corpus import TextCorpus, split_of
from elastic_cuda.training.data import (ROBUST_TASKS, SENSITIVE_TASKS, TASK_CATEGORY, TASKS, DataConfig,
                                        TaskDataset)
from elastic_cuda.training.models import ByteTokenizer


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def train_ds(tok):
    return TaskDataset(tok, split="train", seed=3, config=DataConfig(lengths=(512, 1024), local_window=128, sink=16))


@pytest.fixture(scope="module")
def eval_ds(tok):
    return TaskDataset(tok, split="eval", seed=3, config=DataConfig(lengths=(512, 1024), local_window=128, sink=16))


def test_deterministic_and_varied(tok, train_ds):
    again = TaskDataset(tok, split="train", seed=3, config=train_ds.config)
    for i in range(len(TASKS)):
        a, b = train_ds[i], again[i]
        assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask and a.answer == b.answer
        assert a.task == TASKS[i] == train_ds.task_of(i) and a.category == TASK_CATEGORY[a.task]
    other_seed = TaskDataset(tok, split="train", seed=4, config=train_ds.config, corpus=train_ds.corpus)
    assert train_ds[0].input_ids != other_seed[0].input_ids
    assert train_ds[0].input_ids != train_ds[len(TASKS)].input_ids


@pytest.mark.parametrize("target", [512, 1024, 2048])
def test_lengths_masks_and_answers(tok, train_ds, target):
    for task in TASKS:
        s = train_ds.sample(task, target, key=f"len{target}")
        tol = max(16, int(0.03 * target))
        assert target - tol <= s.num_tokens <= target, (task, target, s.num_tokens)
        assert s.answer.strip(), task
        prompt = tok.decode(s.prompt_ids)
        answer_text = tok.decode(s.input_ids[s.prompt_len:])
        assert answer_text.startswith(s.answer) and answer_text.endswith("<|im_end|>\n")
        assert prompt.endswith("<|im_start|>assistant\n")
        # loss on the answer tokens only (default), the end-of-turn included
        assert s.loss_mask == [0] * s.prompt_len + [1] * (s.num_tokens - s.prompt_len)
        if task in SENSITIVE_TASKS or task == "copy_local":
            assert s.answer in prompt, task  # retrieval answers are in the context


def test_needles_outside_streaming_window(tok, train_ds):
    """Sensitive facts lie before the last local_window tokens and after the sink (sensitive by construction)."""
    window, sink = train_ds.config.local_window, train_ds.config.sink
    for j in range(4):
        s = train_ds.sample("passkey", 1024, key=f"depth{j}")
        prompt = tok.decode(s.prompt_ids)  # byte tokenizer: token index == byte index for ASCII text
        pos = prompt.index("The pass key is")
        assert sink <= pos and pos + 60 < s.prompt_len - window, (pos, s.prompt_len)
        for t in ("kv_retrieval", "fact_qa"):
            s2 = train_ds.sample(t, 1024, key=f"depth{j}")
            p2 = tok.decode(s2.prompt_ids)
            assert p2.index(s2.answer) < s2.prompt_len - window


def test_all_token_loss_mask(tok):
    ds = TaskDataset(tok, split="train", seed=0, config=DataConfig(lengths=(256,), loss_on="all"))
    s = ds[0]
    assert s.loss_mask == [0] + [1] * (s.num_tokens - 1)


def test_variable_tracking_chain(tok, train_ds):
    s = train_ds.sample("variable_tracking", 1024, key="chain")
    prompt = tok.decode(s.prompt_ids)
    target = prompt.split("What is the value of ")[1].split("?")[0]
    # follow the chain backwards through the assignments planted in the text
    assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", prompt))
    name, hops = target, 0
    while not assign[name].isdigit():
        name, hops = assign[name], hops + 1
    assert assign[name] == s.answer and hops == s.meta["hops"]


def test_held_out_split_is_disjoint(train_ds, eval_ds):
    tr, ev = train_ds.corpus, eval_ds.corpus
    assert not set(tr.code_docs) & set(ev.code_docs)
    assert not set(tr.prose_names()) & set(ev.prose_names())
    assert tr.code_docs and ev.code_docs and tr.prose_names() and ev.prose_names()
    frac = len(ev.code_docs) / (len(ev.code_docs) + len(tr.code_docs))
    assert 0.1 < frac < 0.3, frac
    samples = eval_ds.eval_samples([512], 1)
    assert len(samples) == len(TASKS)
    for s in samples:
        assert set(s.meta.get("docs", [])) <= set(ev.code_docs) | set(ev.prose_names())
    assert split_of("stdlib-code:json/decoder.py", 0.2) == split_of("stdlib-code:json/decoder.py", 0.2)


def test_manifest_names_sources(train_ds):
    m = train_ds.manifest()
    counts = m["corpus"]["counts"]
    assert counts["stdlib-code"] > 50 and counts["stdlib-docstrings"] > 50 and counts["pydoc-topics"] > 10
    assert m["corpus"]["split"] == "train" and m["python"]
    assert set(m["task_category"]) == set(TASKS)
    assert set(ROBUST_TASKS) | set(SENSITIVE_TASKS) == set(TASKS)


def test_bad_arguments(tok, train_ds):
    with pytest.raises(ValueError, match="task"):
        train_ds.sample("nope", 512, key="x")
    with pytest.raises(ValueError, match="target_tokens"):
        train_ds.sample("passkey", 64, key="x")
    with pytest.raises(ValueError, match="too short"):
        train_ds.sample("kv_retrieval", 160, key="x")
    with pytest.raises(ValueError, match="loss_on"):
        DataConfig(loss_on="prompt")
    with pytest.raises(ValueError, match="split"):
        TextCorpus(split="test")


def test_byte_tokenizer_roundtrip(tok):
    text = "<|im_start|>user\nhé llo<|im_end|>\n" + "".join(random.Random(0).choice("ab\n") for _ in range(50))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<|im_start|>", "").replace(
        "<|im_end|>", "")
