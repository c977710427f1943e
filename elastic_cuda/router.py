"""Attention Router (arXiv 2601.17367, method-digest section 1): one small MLP per decoder layer that
decides, per input and per KV head, full attention (z = 1) or sparse attention (z = 0).

Input: the layer's key states before RoPE (after k_norm where the model has one), [B, S, Hkv, D].
Boundary pooling (mean of the first 100 and last 100 tokens, overlap counted once) makes the cost
flat in S; a Task MLP D->4D->D and a Router MLP D->4D->D->2 (SiLU, biases) are shared by all KV
heads of the layer. Training: Gumbel-softmax hard one-hot with a straight-through gradient (exactly
0/1 forward); eval: deterministic argmax (FA iff logit[1] > logit[0]).

Two optional additions (ours, docs/decisions.md "Router input standardisation and head bias"), both off in the
paper's architecture and on in the routers we train:
  * input standardisation: pooled keys are dominated by a per-head constant (between-prompt spread is 10-20% of
    their magnitude on SmolLM2), so the paper's MLP at N(0, 0.02) init barely sees what differs between prompts
    and, at our batch sizes, did not separate task types in 300 steps. Fixed per-(KV head, dim) mean/std buffers,
    measured on calibration prompts before training (start/finish_input_calibration), whiten the input.
  * head bias: a learned [Hkv, 2] logit offset, so a head's identity (which standardisation removes from the
    input) can still make it FULL or sparse for every input, as DuoAttention's retrieval heads are.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .attention.sparse_config import SPARSE_MODES, SparseConfig
from .ops import BLOCK, FULL, STREAM, boundary_pool, router_decision

ROUTER_FORMAT_VERSION = 1
WEIGHTS_FILE = "routers.safetensors"
CONFIG_FILE = "router_config.json"
_GUMBEL_EPS = 1e-8
# The module types of the MLPs as AttentionRouter builds them (what ops.router_decision computes).
_TASK_KINDS = (nn.Linear, nn.SiLU, nn.Linear)
_ROUTER_KINDS = (nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear)

__all__ = ["AttentionRouter", "RouterOutput", "RouterSet", "SPARSE_MODES", "check_sparsity_shift", "model_router_geometry"]


@dataclass
class RouterOutput:
    """logits [B, Hkv, 2] (index 1 = FULL); z [B, Hkv] float, exactly 0/1 (straight-through gradient in
    training); head_mode [B, Hkv] int32 (FULL where z == 1, else the caller's sparse mode);
    gumbel_u: the uniform noise used in training (None in eval), so a recomputation can reuse it."""
    logits: torch.Tensor
    z: torch.Tensor
    head_mode: torch.Tensor
    gumbel_u: torch.Tensor | None = None


def check_sparse_mode_id(sparse_mode, where: str):
    """ValueError unless `sparse_mode` is the STREAM or BLOCK head-mode id (what a router routes sparse heads to)."""
    if sparse_mode not in (STREAM, BLOCK):
        raise ValueError(f"{where}sparse_mode must be {STREAM} (stream) or {BLOCK} (block), got {sparse_mode!r}")


def check_sparsity_shift(shift, batch: int | None = None, where: str = ""):
    """ValueError unless `shift` is a float (not NaN) or a 1-D float tensor [B] (of `batch` rows when given)."""
    if isinstance(shift, torch.Tensor):
        if shift.dim() != 1 or not shift.is_floating_point() or (batch is not None and shift.shape[0] != batch):
            rows = "B" if batch is None else f"B={batch}"
            raise ValueError(f"{where}sparsity_shift must be a float or a float tensor [{rows}] (one per request), "
                             f"got {shift.dtype} {tuple(shift.shape)}")
    elif isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift != shift:
        raise ValueError(f"{where}sparsity_shift must be a float or a float tensor [B], got {shift!r}")


def sparsity_shift_column(shift, batch: int, device) -> torch.Tensor | float:
    """A float, or the [B, 1] column of a per-request tensor [B] (broadcast over the KV heads)."""
    check_sparsity_shift(shift, batch)
    if isinstance(shift, torch.Tensor):
        return shift.to(device=device, dtype=torch.float32)[:, None]
    return float(shift)


@functools.lru_cache(maxsize=None)
def _mode_scalar(mode: int, device: torch.device) -> torch.Tensor:
    """0-dim int32 tensor `mode` on `device`, made once (on CUDA one host-to-device copy per device and mode)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(mode, dtype=torch.int32, device=device)


def full_heads_of(logits: torch.Tensor, shift) -> torch.Tensor:
    """bool [B, Hkv]: the eval decision logit_full - logit_sparse > shift. With the default shift 0.0 it is the
    comparison logit_full > logit_sparse, one kernel instead of a subtraction and a comparison, and the same bits:
    in IEEE arithmetic with subnormals a - b > 0 exactly when a > b (both False for a NaN, and for inf - inf). The
    one exception is a CPU run with torch.set_flush_denormal(True) and two logits closer than 2**-126, i.e. both
    within ~1e-30 of each other near 0."""
    if isinstance(shift, float) and shift == 0.0:
        return torch.gt(logits[..., 1], logits[..., 0])
    return logits[..., 1] - logits[..., 0] > shift


def head_modes_of(full: torch.Tensor, sparse_mode: int) -> torch.Tensor:
    """int32 head modes in one where over cached 0-dim mode tensors (was full_like x 2, where and a cast)."""
    return torch.where(full, _mode_scalar(FULL, full.device), _mode_scalar(sparse_mode, full.device))


class AttentionRouter(nn.Module):
    """Router of one decoder layer, shared by its KV heads (the weights do not depend on Hkv)."""

    def __init__(self, head_dim: int, hidden_mult: int = 4, n_first: int = 100, n_last: int = 100,
                 num_kv_heads: int | None = None, standardize_input: bool = False, head_bias: bool = False):
        super().__init__()
        if (standardize_input or head_bias) and not (isinstance(num_kv_heads, int) and num_kv_heads > 0):
            raise ValueError(f"AttentionRouter: standardize_input / head_bias need num_kv_heads > 0, "
                             f"got {num_kv_heads!r}")
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
        self.num_kv_heads = num_kv_heads
        self.standardize_input, self.use_head_bias = bool(standardize_input), bool(head_bias)
        if self.standardize_input:
            self.register_buffer("input_mean", torch.zeros(num_kv_heads, head_dim))
            self.register_buffer("input_std", torch.ones(num_kv_heads, head_dim))
        if self.use_head_bias:
            self.head_bias = nn.Parameter(torch.zeros(num_kv_heads, 2))
        self._calibration = None  # float64 [sum (Hkv, D), sum of squares (Hkv, D)] and a count, while calibrating
        self.reset_parameters()

    def reset_parameters(self):
        # HF-style init (what the paper's routers effectively got): N(0, 0.02) weights, zero biases, so
        # the logits start near 0 and training starts from ~50/50 routing.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                nn.init.zeros_(m.bias)
        if self.use_head_bias:
            nn.init.zeros_(self.head_bias)

    # ------------------------------------------------------------------ input standardisation
    def start_input_calibration(self):
        """Accumulate pooled-key statistics on every following logits() call (no routing change until finish)."""
        if not self.standardize_input:
            raise ValueError("AttentionRouter: start_input_calibration needs standardize_input=True")
        shape = (self.num_kv_heads, self.head_dim)
        dev = self.input_mean.device
        self._calibration = [torch.zeros(shape, dtype=torch.float64, device=dev),
                             torch.zeros(shape, dtype=torch.float64, device=dev), 0]

    def calibration_sums(self) -> torch.Tensor:
        """float64 [2 * Hkv * D + 1]: sums, sums of squares, count (so ranks can all-reduce them)."""
        if self._calibration is None:
            raise ValueError("AttentionRouter: no calibration in progress (call start_input_calibration)")
        s, sq, n = self._calibration
        return torch.cat([s.flatten(), sq.flatten(), torch.tensor([float(n)], dtype=torch.float64, device=s.device)])

    def finish_input_calibration(self, sums: torch.Tensor | None = None, std_floor: float = 0.1) -> int:
        """Set input_mean/std from the accumulated (or given, e.g. all-reduced) sums; returns the sample count.
        std is floored at std_floor x the head's mean std so that a near-constant dimension is not blown up."""
        sums = self.calibration_sums() if sums is None else sums.to(torch.float64)
        hd = self.num_kv_heads * self.head_dim
        n = float(sums[-1])
        if n < 2:
            raise ValueError(f"AttentionRouter: input calibration needs >= 2 samples, got {n:g}")
        mean = (sums[:hd] / n).view(self.num_kv_heads, self.head_dim)
        var = ((sums[hd:2 * hd] / n).view_as(mean) - mean * mean).clamp_min(0) * (n / (n - 1))
        std = var.sqrt()
        std = torch.maximum(std, std_floor * std.mean(dim=-1, keepdim=True)).clamp_min(1e-6)
        with torch.no_grad():
            self.input_mean.copy_(mean.to(self.input_mean.dtype))
            self.input_std.copy_(std.to(self.input_std.dtype))
        self._calibration = None
        return int(n)

    def _first_weight(self) -> torch.Tensor:
        """task_mlp[0].weight (the routers' dtype and device), without Sequential.__getitem__'s Python."""
        first = next(iter(self._modules["task_mlp"]._modules.values()))
        return first._parameters["weight"] if type(first) is nn.Linear else first.weight

    def logits(self, keys: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Routing logits [B, Hkv, 2] from pre-RoPE keys [B, S, Hkv, D] (or packed [T, Hkv, D] + cu_seqlens)."""
        return self.logits_of_pooled(self.pooled(keys, cu_seqlens))

    def pooled(self, keys: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's input before standardisation: boundary-pooled keys [B, Hkv, D] in the routers' dtype and
        device (and, while calibrating, their statistics accumulated)."""
        if not isinstance(keys, torch.Tensor) or keys.shape[-1] != self.head_dim:
            got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"AttentionRouter: keys must end in head_dim={self.head_dim}, got {got}")
        pooled = boundary_pool(keys, n_first=self.n_first, n_last=self.n_last, cu_seqlens=cu_seqlens)
        weight = self._first_weight()
        if pooled.dtype != weight.dtype or pooled.device != weight.device:
            pooled = pooled.to(device=weight.device, dtype=weight.dtype)
        if self.num_kv_heads is not None and pooled.shape[1] != self.num_kv_heads:
            raise ValueError(f"AttentionRouter: built for {self.num_kv_heads} KV heads, keys have {pooled.shape[1]}")
        if self._calibration is not None:
            p = pooled.detach().to(torch.float64)
            self._calibration[0] += p.sum(0)
            self._calibration[1] += (p * p).sum(0)
            self._calibration[2] += p.shape[0]
        return pooled

    def logits_of_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Routing logits [B, Hkv, 2] of pooled keys [B, Hkv, D] (pooled()): standardisation, MLPs, head bias."""
        if self.standardize_input:
            pooled = (pooled - self.input_mean) / self.input_std
        # The two MLPs as functional calls on the [B * Hkv, D] rows: the same addmm / silu kernels as the modules
        # (nn.Linear on a contiguous 3-D input folds it to this 2-D addmm), without 10 module calls and a view pair
        # per Linear in every layer of a prefill: the router was ~45 ops of a ~56-op elastic layer on CUDA, where
        # the prefill is launch-bound (#14 / #15, experiments/host_overhead_per_layer.py).
        # The submodules and parameters are read from the modules' own dicts (not through nn.Module.__getattr__ and
        # Sequential's iterator): ~10 us less Python per layer, measured on the CPU (experiments/
        # host_overhead_per_layer.py), and still whatever the modules hold now (no cached copy to go stale).
        B, Hkv = pooled.shape[:2]
        x = pooled.reshape(B * Hkv, pooled.shape[2])
        for mlp in (self._modules["task_mlp"], self._modules["router_mlp"]):
            for layer in mlp._modules.values():
                if type(layer) is nn.Linear:
                    params = layer._parameters
                    x = F.linear(x, params["weight"], params["bias"])
                elif type(layer) is nn.SiLU:
                    x = F.silu(x)
                elif isinstance(layer, nn.Linear):
                    x = F.linear(x, layer.weight, layer.bias)
                else:
                    x = F.silu(x) if isinstance(layer, nn.SiLU) else layer(x)
        logits = x.view(B, Hkv, x.shape[1])
        return logits + self.head_bias if self.use_head_bias else logits

    def forward(self, keys: torch.Tensor, tau: float = 1.0, cu_seqlens: torch.Tensor | None = None,
                sparse_mode: int = STREAM, gumbel_u: torch.Tensor | None = None,
                sparsity_shift: float | torch.Tensor = 0.0) -> RouterOutput:
        """Route every (sample, KV head). sparse_mode: the head mode written where z == 0.
        gumbel_u (training only): reuse this uniform noise instead of drawing new (activation recomputation).
        sparsity_shift (inference only): a head goes FULL iff logit_full - logit_sparse > shift; > 0 routes more
        heads sparse, < 0 fewer, 0 is the trained decision. A float, or a tensor [B] (one budget per request)."""
        check_sparse_mode_id(sparse_mode, "AttentionRouter: ")
        logits = self.logits(keys, cu_seqlens)
        shift = sparsity_shift_column(sparsity_shift, logits.shape[0], logits.device)
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
            full = full_heads_of(logits, shift)
            z = full.to(logits.dtype)
        if self.training:
            full = z.detach() > 0.5
        return RouterOutput(logits=logits, z=z, head_mode=head_modes_of(full, sparse_mode), gumbel_u=gumbel_u)

    def route(self, keys: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, sparse_mode: int = STREAM,
              sparsity_shift: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.dtype]:
        """The eval decision alone: (head_mode int32 [B, Hkv], bit for bit forward(...).head_mode of a router in eval
        mode, and the logits' dtype: forward's z is (head_mode == FULL) in that dtype). For the prefill of an elastic
        model, where every layer decides and nothing reads z or the logits: no z kernel, no RouterOutput, no module
        call (hooks) in a prefill that is launch-bound on a GPU (#15). Routers in training mode use forward()."""
        if self.training:
            raise RuntimeError("AttentionRouter.route is the eval decision; a router in training mode samples its "
                               "decision in forward()")
        check_sparse_mode_id(sparse_mode, "AttentionRouter: ")
        logits = self.logits(keys, cu_seqlens)
        full = full_heads_of(logits, sparsity_shift_column(sparsity_shift, logits.shape[0], logits.device))
        return head_modes_of(full, sparse_mode), logits.dtype

    def route_fused(self, keys: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, sparse_mode: int = STREAM,
                    sparsity_shift: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.dtype]:
        """route(...) as one operator (ops.router_decision: the boundary pool, the MLPs and the decision in one
        dispatch, one kernel on CUDA for fp32 routers), for the prefill of a small model, whose elastic layer is
        host-bound on a GPU (#15: route() is ~23 ops per layer, a boundary pool and ~13 kernels among them, and their
        Python).

        On the CPU, and on CUDA for routers that are not fp32 or with ELASTIC_ROUTER_KERNEL=0, the op runs route()'s
        own ATen ops: the same bits. The CUDA kernel sums the Linear layers in its own order: its logits differ by
        rounding, so a decision can differ from route()'s only at a near-tie (csrc/router/router_decision_cuda.cu).
        What the op does not model runs route() itself: a router calibrating its input, a replaced submodule (an MLP
        that is not Linear / SiLU as built), keys on another device than the router, torch.compile tracing."""
        if self.training:
            raise RuntimeError("AttentionRouter.route_fused is the eval decision; a router in training mode samples "
                               "its decision in forward()")
        mlp = self._fused_mlp()
        if (mlp is None or self._calibration is not None or not isinstance(keys, torch.Tensor)
                or keys.device != mlp[0].device or torch.compiler.is_compiling()):
            return self.route(keys, cu_seqlens=cu_seqlens, sparse_mode=sparse_mode, sparsity_shift=sparsity_shift)
        check_sparse_mode_id(sparse_mode, "AttentionRouter: ")
        if keys.shape[-1] != self.head_dim:
            raise ValueError(f"AttentionRouter: keys must end in head_dim={self.head_dim}, got {tuple(keys.shape)}")
        if self.num_kv_heads is not None and keys.dim() >= 2 and keys.shape[-2] != self.num_kv_heads:
            raise ValueError(f"AttentionRouter: built for {self.num_kv_heads} KV heads, keys have {keys.shape[-2]}")
        shift, shift_value = None, 0.0
        if isinstance(sparsity_shift, torch.Tensor):
            batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else keys.shape[0]
            check_sparsity_shift(sparsity_shift, batch)
            shift = sparsity_shift.to(device=keys.device, dtype=torch.float32)  # what sparsity_shift_column makes
        else:
            check_sparsity_shift(sparsity_shift)
            shift_value = float(sparsity_shift)
        buffers, params = self._buffers, self._parameters
        head_mode, logits = router_decision(
            keys, mlp, cu_seqlens=cu_seqlens, input_mean=buffers["input_mean"] if self.standardize_input else None,
            input_std=buffers["input_std"] if self.standardize_input else None,
            head_bias=params["head_bias"] if self.use_head_bias else None, shift=shift, n_first=self.n_first,
            n_last=self.n_last, shift_value=shift_value, sparse_mode=sparse_mode)
        return head_mode, logits.dtype

    def _fused_mlp(self) -> list | None:
        """The weight and bias of the five Linear layers, in order, when the MLPs are as built (Linear, SiLU, Linear
        and Linear, SiLU, Linear, SiLU, Linear), else None. Read from the modules each call (nothing to go stale)."""
        tensors = []
        for mlp, kinds in ((self._modules["task_mlp"], _TASK_KINDS), (self._modules["router_mlp"], _ROUTER_KINDS)):
            layers = mlp._modules.values()
            if tuple(type(m) for m in layers) != kinds:
                return None
            for m in layers:
                if type(m) is nn.Linear:
                    params = m._parameters
                    if params["bias"] is None:
                        return None
                    tensors.append(params["weight"])
                    tensors.append(params["bias"])
        return tensors

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, hidden_mult={self.hidden_mult}, n_first={self.n_first}, n_last={self.n_last}, "
                f"num_kv_heads={self.num_kv_heads}, standardize_input={self.standardize_input}, "
                f"head_bias={self.use_head_bias}")


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
    # standardize_input / head_bias default to the paper's architecture (and to routers saved before they existed)
    # The sparse settings (sparse mode, sink, window, block_size, xattn_*) are a SparseConfig's, under its key names.
    DEFAULTS = {**SparseConfig().to_dict(), "hidden_mult": 4, "n_first": 100, "n_last": 100,
                "standardize_input": False, "head_bias": False}

    def __init__(self, config: dict):
        super().__init__()
        cfg = dict(self.DEFAULTS)
        cfg.update(config)
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                raise ValueError(f"RouterSet: config[{key!r}] must be a positive int, got {cfg.get(key)!r}")
        SparseConfig.from_dict(cfg, where="RouterSet: ")  # ValueError on a bad sparse setting
        # A config is read from a user's file: settings the routers do not check themselves are checked here, so
        # a wrong type fails at load and not in the middle of a forward (the sparse settings: SparseConfig above).
        for key in ("n_first", "n_last"):
            if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
                raise ValueError(f"RouterSet: config[{key!r}] must be an int, got {cfg[key]!r}")
        for key in ("standardize_input", "head_bias"):
            if not isinstance(cfg[key], bool):
                raise ValueError(f"RouterSet: config[{key!r}] must be true or false, got {cfg[key]!r}")
        cfg.setdefault("model_name", "")
        cfg["version"] = ROUTER_FORMAT_VERSION
        self.config = cfg
        self.routers = nn.ModuleList(
            AttentionRouter(cfg["head_dim"], cfg["hidden_mult"], cfg["n_first"], cfg["n_last"],
                            num_kv_heads=cfg["num_kv_heads"], standardize_input=cfg["standardize_input"],
                            head_bias=cfg["head_bias"])
            for _ in range(cfg["num_layers"]))

    @property
    def sparse_config(self) -> SparseConfig:
        """What the heads these routers send sparse run (the settings they were trained with)."""
        return SparseConfig.from_dict(self.config, where="RouterSet: ")

    @property
    def sparse_mode_id(self) -> int:
        return SPARSE_MODES[self.config["sparse_mode"]]

    def __len__(self):
        return len(self.routers)

    def start_input_calibration(self):
        """Every layer's router accumulates pooled-key statistics from the following forwards (see AttentionRouter)."""
        for r in self.routers:
            r.start_input_calibration()

    def calibration_sums(self) -> torch.Tensor:
        """[L, 2 * Hkv * D + 1] float64 statistics so far (all-reduce them over ranks before finishing)."""
        return torch.stack([r.calibration_sums() for r in self.routers])

    def finish_input_calibration(self, sums: torch.Tensor | None = None) -> int:
        """Set every router's input standardisation; returns the number of (sample, layer) observations of layer 0."""
        counts = [r.finish_input_calibration(None if sums is None else sums[i]) for i, r in enumerate(self.routers)]
        return counts[0]

    def __getitem__(self, layer_idx: int) -> AttentionRouter:
        # The ModuleList's own dict ("0".."L-1") first: its __getitem__ costs len() and operator.index in Python, in
        # every layer of a prefill (#15); negative indices and slices take the ModuleList's way.
        if type(layer_idx) is int and layer_idx >= 0:
            router = self.routers._modules.get(str(layer_idx))
            if router is not None:
                return router
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
        """Read a RouterSet written by save(); with `model`, check it matches. Every problem with the files (missing,
        not JSON / safetensors, wrong keys, shapes or types, non-finite weights or statistics) is a ValueError that
        names the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        cfg_path, w_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"RouterSet.load: {p} not found (a router directory holds {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE})")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"RouterSet.load: cannot read {cfg_path} as JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"RouterSet.load: {cfg_path} must hold a JSON object, got a {type(cfg).__name__}")
        version = cfg.get("version")
        if version != ROUTER_FORMAT_VERSION:
            raise ValueError(f"RouterSet.load: {cfg_path} has format version {version!r}, this elastic_cuda reads "
                             f"version {ROUTER_FORMAT_VERSION}")
        try:
            routers = cls(cfg)
        except ValueError as e:
            raise ValueError(f"RouterSet.load: {cfg_path}: {e}") from None
        if model is not None:
            routers.check_model(model)
        try:
            state = load_file(w_path, device="cpu")  # checked on the host, then moved
        except (OSError, SafetensorError) as e:
            raise ValueError(f"RouterSet.load: cannot read {w_path} as safetensors ({e})") from None
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
            # NaN weights would compare False in every routing decision and send every head sparse, silently.
            if not v.is_floating_point():
                raise ValueError(f"RouterSet.load: tensor {k} in {w_path} must be floating point, got {v.dtype}")
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                raise ValueError(f"RouterSet.load: tensor {k} in {w_path} has {bad} non-finite (NaN/inf) values")
            if k.endswith("input_std") and not bool((v > 0).all()):
                raise ValueError(f"RouterSet.load: tensor {k} in {w_path} must be > 0 (a standard deviation)")
        routers.load_state_dict(state)
        return routers.to(map_location)
