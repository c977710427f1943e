"""Checkpoint files without pickle: a nested state (dicts, lists, tuples, numbers, strings, None, tensors) is written
as `<name>.json` (the structure) plus `<name>.safetensors` (the tensors it refers to).

Why: `torch.load(weights_only=False)` on a downloaded or shared checkpoint runs whatever code its pickle names.
JSON and safetensors only ever produce data, so `--resume` cannot run code from a checkpoint. Optimizer and
scheduler state dicts, the step, the config and the RNG states (Python's is a tuple of ints, torch's a uint8
tensor) all fit this form.

Encoding (JSON side): a tensor is {"__tensor__": key}; a tuple {"__tuple__": [...]}; a dict whose keys are not all
plain strings (an optimizer's state is keyed by parameter index) or that uses one of these markers as a key is
{"__dict__": [[key, value], ...]}; everything else is itself. Floats keep NaN/inf (Python's JSON extension).
"""
from __future__ import annotations

import json
import os

import torch

JSON_SUFFIX, TENSORS_SUFFIX = ".json", ".safetensors"
FORMAT = "elastic_cuda.checkpoint/1"
_MARKERS = ("__tensor__", "__tuple__", "__dict__")

__all__ = ["save_state", "load_state", "state_exists"]


def _encode(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # safetensors stores whole, contiguous, unshared buffers: clone the view
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(f"checkpoint: {where} is a {type(obj).__name__}; a checkpoint holds only dicts, lists, tuples, "
                    "numbers, strings, None and tensors")


def _decode(obj, tensors: dict, path: str):
    if isinstance(obj, list):
        return [_decode(x, tensors, path) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise ValueError(f"checkpoint: {path} refers to tensor {key!r}, which its {TENSORS_SUFFIX} file lacks")
        return tensors[key]
    if len(obj) == 1 and "__tuple__" in obj and isinstance(obj["__tuple__"], list):
        return tuple(_decode(x, tensors, path) for x in obj["__tuple__"])
    if len(obj) == 1 and "__dict__" in obj and isinstance(obj["__dict__"], list):
        items = obj["__dict__"]
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
            raise ValueError(f"checkpoint: {path} has a malformed __dict__ entry")
        out = {}
        for k, v in items:
            k = _decode(k, tensors, path)
            if isinstance(k, (list, dict, torch.Tensor)):
                raise ValueError(f"checkpoint: {path} has a dict key of type {type(k).__name__}")
            out[k] = _decode(v, tensors, path)
        return out
    return {k: _decode(v, tensors, path) for k, v in obj.items()}


def _replace_atomically(path: str, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_state(state, prefix: str):
    """Write `state` as prefix.safetensors then prefix.json (the JSON last: its presence marks a complete save)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = {"format": FORMAT, "state": _encode(state, tensors, "state")}
    _replace_atomically(prefix + TENSORS_SUFFIX, lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_json(p):
        with open(p, "w") as f:
            json.dump(tree, f)

    _replace_atomically(prefix + JSON_SUFFIX, write_json)


def state_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + JSON_SUFFIX)


def load_state(prefix: str, device="cpu"):
    """Read what save_state wrote; tensors go to `device`. A missing or malformed file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, tensors_path = prefix + JSON_SUFFIX, prefix + TENSORS_SUFFIX
    for p in (json_path, tensors_path):
        if not os.path.isfile(p):
            raise ValueError(f"checkpoint: {p} not found")
    try:
        with open(json_path, encoding="utf-8") as f:
            tree = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint: cannot read {json_path} as JSON ({e})") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT or "state" not in tree:
        raise ValueError(f"checkpoint: {json_path} is not an elastic_cuda checkpoint (format {FORMAT!r})")
    try:
        tensors = load_file(tensors_path, device=str(device))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"checkpoint: cannot read {tensors_path} as safetensors ({e})") from None
    return _decode(tree["state"], tensors, json_path)
