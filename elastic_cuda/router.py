"""Attention Router (arXiv 2601.17367, method-digest section 1): one small MLP per decoder layer that
decides, per input and per KV head, full attention (z = 1) or sparse attention (z = 0).

Input: the layer's key states before RoPE (after k_norm where the model has one), [B, S, Hkv, D].
Boundary pooling (mean of the first 100 and last 100 tokens, overlap counted once) makes the cost
flat in S; a Task MLP D->4D->D and a Router MLP D->4D->D->2 (SiLU, biases) are shared by all KV
heads of the layer. Training: Gumbel-softmax hard one-hot with a straight-through gradient (exactly
0/1 forward); eval: deterministic argmax (FA iff logit[1] > logit[0]).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .ops import BLOCK, FULL, STREAM, boundary_pool

ROUTER_FORMAT_VERSION = 1
WEIGHTS_FILE = "routers.safetensors"
CONFIG_FILE = "router_config.json"
SPARSE_MODES = {"stream": STREAM, "block": BLOCK}
_GUMBEL_EPS = 1e-8

__all__ = ["AttentionRouter", "RouterOutput", "RouterSet", "SPARSE_MODES", "model_router_geometry"]


@dataclass
class RouterOutput:
    """logits [B, Hkv, 2] (index 1 = FULL); z [B, Hkv] float, exactly 0/1 (straight-through gradient in
    training); head_mode [B, Hkv] int32 (FULL where z == 1, else the caller's sparse mode);
    gumbel_u: the uniform noise used in training (None in eval), so a recomputation can reuse it."""
    logits: torch.Tensor
    z: torch.Tensor
    head_mode: torch.Tensor
    gumbel_u: torch.Tensor | None = None


class AttentionRouter(nn.Module):
    """Router of one decoder layer, shared by its KV heads (the weights do not depend on Hkv)."""

    def __init__(self, head_dim: int, hidden_mult: int = 4, n_first: int = 100, n_last: int = 100):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"AttentionRouter: head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(hidden_mult, int) or hidden_mult <= 0:
            raise ValueError(f"AttentionRouter: hidden_mult must be a positive int, got {hidden_mult!r}")
        if n_first < 0 or n_last < 0 or n_first + n_last == 0:
            raise ValueError(f"AttentionRouter: n_first/n_last must be >= 0 and not both 0, got {n_first}, {n_last}")
        self.head_dim, self.hidden_mult = head_dim, hidden_mult
        self.n_first, self.n_last = n_first, n_last
        hidden = hidden_mult * head_dim
        self.task_mlp = nn.Sequential(nn.Linear(head_dim, hidden), nn.SiLU(), nn.Linear(hidden, head_dim))
        self.router_mlp = nn.Sequential(nn.Linear(head_dim, hidden), nn.SiLU(), nn.Linear(hidden, head_dim), nn.SiLU(),
                                        nn.Linear(head_dim, 2))
        self.reset_parameters()

    def reset_parameters(self):
        # HF-style init (what the paper's routers effectively got): N(0, 0.02) weights, zero biases, so
        # the logits start near 0 and training starts from ~50/50 routing.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                nn.init.zeros_(m.bias)

    def logits(self, keys: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Routing logits [B, Hkv, 2] from pre-RoPE keys [B, S, Hkv, D] (or packed [T, Hkv, D] + cu_seqlens)."""
        if not isinstance(keys, torch.Tensor) or keys.shape[-1] != self.head_dim:
            got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"AttentionRouter: keys must end in head_dim={self.head_dim}, got {got}")
        pooled = boundary_pool(keys, n_first=self.n_first, n_last=self.n_last, cu_seqlens=cu_seqlens)
        weight = self.task_mlp[0].weight
        return self.router_mlp(self.task_mlp(pooled.to(device=weight.device, dtype=weight.dtype)))

    def forward(self, keys: torch.Tensor, tau: float = 1.0, cu_seqlens: torch.Tensor | None = None,
                sparse_mode: int = STREAM, gumbel_u: torch.Tensor | None = None) -> RouterOutput:
        """Route every (sample, KV head). sparse_mode: the head mode written where z == 0.
        gumbel_u (training only): reuse this uniform noise instead of drawing new (activation recomputation)."""
        if sparse_mode not in (STREAM, BLOCK):
            raise ValueError(f"AttentionRouter: sparse_mode must be {STREAM} (stream) or {BLOCK} (block), "
                             f"got {sparse_mode!r}")
        logits = self.logits(keys, cu_seqlens)
        if self.training:
            if not (isinstance(tau, (int, float)) and tau > 0):
                raise ValueError(f"AttentionRouter: tau must be a positive number, got {tau!r}")
            if gumbel_u is None:
                gumbel_u = torch.rand_like(logits)
            elif gumbel_u.shape != logits.shape:
                raise ValueError(f"AttentionRouter: gumbel_u must have shape {tuple(logits.shape)}, "
                                 f"got {tuple(gumbel_u.shape)}")
            gumbel = -torch.log(-torch.log(gumbel_u + _GUMBEL_EPS) + _GUMBEL_EPS)
            probs = torch.softmax((logits + gumbel) / tau, dim=-1)
            hard = torch.nn.functional.one_hot(probs.argmax(dim=-1), 2).to(probs.dtype)
            # Straight-through: forward value is exactly `hard` (p - p.detach() is exactly 0; (hard + p) - p would
            # round to 0.99999994), backward is dp.
            z = (hard + (probs - probs.detach()))[..., 1]
        else:
            gumbel_u = None
            z = (logits[..., 1] > logits[..., 0]).to(logits.dtype)
        head_mode = torch.where(z.detach() > 0.5, torch.full_like(z, FULL), torch.full_like(z, sparse_mode))
        return RouterOutput(logits=logits, z=z, head_mode=head_mode.to(torch.int32), gumbel_u=gumbel_u)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, hidden_mult={self.hidden_mult}, n_first={self.n_first}, n_last={self.n_last}"


def model_router_geometry(model) -> dict:
    """What a RouterSet must match in a transformers model: type, layer count, KV heads, head dim."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"model must be a transformers model with a .config, got {type(model).__name__}")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return {
        "model_name": getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", "") or "",
        "model_type": getattr(cfg, "model_type", ""),
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        "num_q_heads": int(n_heads),
        "head_dim": int(head_dim),
    }


class RouterSet(nn.Module):
    """One AttentionRouter per decoder layer plus the config that ties them to a model."""

    _STRUCTURAL_KEYS = ("num_layers", "num_kv_heads", "head_dim")
    DEFAULTS = {"sink": 64, "window": 512, "sparse_mode": "stream", "hidden_mult": 4, "n_first": 100, "n_last": 100}

    def __init__(self, config: dict):
        super().__init__()
        cfg = dict(self.DEFAULTS)
        cfg.update(config)
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                raise ValueError(f"RouterSet: config[{key!r}] must be a positive int, got {cfg.get(key)!r}")
        if cfg["sparse_mode"] not in SPARSE_MODES:
            raise ValueError(f"RouterSet: sparse_mode must be one of {sorted(SPARSE_MODES)}, got {cfg['sparse_mode']!r}")
        cfg.setdefault("model_name", "")
        cfg["version"] = ROUTER_FORMAT_VERSION
        self.config = cfg
        self.routers = nn.ModuleList(
            AttentionRouter(cfg["head_dim"], cfg["hidden_mult"], cfg["n_first"], cfg["n_last"])
            for _ in range(cfg["num_layers"]))

    @property
    def sparse_mode_id(self) -> int:
        return SPARSE_MODES[self.config["sparse_mode"]]

    def __len__(self):
        return len(self.routers)

    def __getitem__(self, layer_idx: int) -> AttentionRouter:
        return self.routers[layer_idx]

    @classmethod
    def for_model(cls, model, **config_overrides) -> "RouterSet":
        """Freshly initialised routers sized for `model` (a transformers causal LM)."""
        cfg = model_router_geometry(model)
        cfg.update(config_overrides)
        return cls(cfg)

    def check_model(self, model):
        """Raise ValueError when `model` does not have the geometry these routers were built for."""
        geo = model_router_geometry(model)
        bad = [f"{k}: routers {self.config.get(k)} vs model {geo[k]}" for k in self._STRUCTURAL_KEYS
               if self.config.get(k) != geo[k]]
        if bad:
            raise ValueError("RouterSet does not match this model (" + "; ".join(bad) + f"); routers were trained for "
                             f"{self.config.get('model_name')!r}")
        if self.config.get("model_type") and geo["model_type"] and self.config["model_type"] != geo["model_type"]:
            raise ValueError(f"RouterSet was built for model_type {self.config['model_type']!r}, "
                             f"model is {geo['model_type']!r}")
        if self.config.get("model_name") and geo["model_name"] and \
                os.path.basename(str(self.config["model_name"]).rstrip("/")) != \
                os.path.basename(str(geo["model_name"]).rstrip("/")):
            # The same weights load from different paths on different machines: warn, do not fail.
            warnings.warn(f"RouterSet was saved for model {self.config['model_name']!r}, loading into "
                          f"{geo['model_name']!r} (geometry matches)", stacklevel=3)

    def save(self, directory: str):
        """Write routers.safetensors + router_config.json into `directory` (created if needed)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str, model=None, map_location="cpu") -> "RouterSet":
        """Read a RouterSet written by save(); with `model`, check it matches (ValueError otherwise)."""
        from safetensors.torch import load_file

        cfg_path, w_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"RouterSet.load: {p} not found (a router directory holds {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE})")
        with open(cfg_path) as f:
            cfg = json.load(f)
        version = cfg.get("version")
        if version != ROUTER_FORMAT_VERSION:
            raise ValueError(f"RouterSet.load: {cfg_path} has format version {version!r}, this elastic_cuda reads "
                             f"version {ROUTER_FORMAT_VERSION}")
        routers = cls(cfg)
        if model is not None:
            routers.check_model(model)
        state = load_file(w_path, device=str(map_location))
        expected = routers.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"RouterSet.load: {w_path} does not match {cfg_path}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"RouterSet.load: tensor {k} has shape {tuple(v.shape)}, config implies "
                                 f"{tuple(expected[k].shape)}")
        routers.load_state_dict(state)
        return routers.to(map_location)
