"""What a sparse head runs, in one place: the sparse mode and its settings, their defaults and their validation.

A head the router does not keep FULL runs the sparse mode: STREAM (the `sink` first keys and the last `window`
keys) or BLOCK (XAttention block masks of `block_size` blocks, estimated at prefill with antidiagonal `xattn_stride`
and mass `xattn_threshold`; attention/xattn.py). RouterSet keeps these in its JSON config (same key names), enable()
settles them from the routers and the caller's overrides, and the trainer, the eval and the CLI default to them.

Defaults: STREAM sink 64 / window 512, sized for SmolLM2 at 2K-8K prompts (a streaming head then sees < 30% of the
context, so the router has a real choice to learn; the paper's 128 / 2048 would cover most of a 2K prompt). BLOCK
block 128 / stride 16 / threshold 0.9, the values of the paper's training code. The raw op's own defaults
(ops.attention: sink 128, window 2048, the paper's) belong to the op, not to a model's routing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ops import BLOCK, STREAM
from .xattn import XATTN_STRIDE, XATTN_THRESHOLD, check_xattn_args

SPARSE_MODES = {"stream": STREAM, "block": BLOCK}

__all__ = ["DEFAULT", "SPARSE_MODES", "SparseConfig", "check_sparse_settings"]


@dataclass(frozen=True)
class SparseConfig:
    sparse_mode: str = "stream"
    sink: int = 64
    window: int = 512
    block_size: int = 128
    xattn_stride: int = XATTN_STRIDE
    xattn_threshold: float = XATTN_THRESHOLD

    def __post_init__(self):
        check_sparse_settings(dataclasses.asdict(self))

    @property
    def mode_id(self) -> int:
        """The head-mode value a sparse head gets (ops.STREAM or ops.BLOCK)."""
        return SPARSE_MODES[self.sparse_mode]

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, config: dict, where: str = "SparseConfig: ") -> "SparseConfig":
        """The sparse settings of a larger dict (a RouterSet's config, a TrainConfig's fields); missing keys take
        the defaults, other keys are ignored."""
        return cls._checked({k: config[k] for k in cls.keys() if k in config}, where)

    def replace(self, where: str = "SparseConfig: ", **overrides) -> "SparseConfig":
        """A copy with the given settings changed; an override of None keeps this config's value."""
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return self._checked(values, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _checked(cls, values: dict, where: str) -> "SparseConfig":
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"{where}unknown sparse settings {unknown}; known: {list(cls.keys())}")
        values = {**dataclasses.asdict(DEFAULT), **values}
        check_sparse_settings(values, where)  # first, so that the error names who passed the setting
        return cls(**values)


def check_sparse_settings(values: dict, where: str = "SparseConfig: "):
    """ValueError naming the bad setting (prefixed by `where`). The BLOCK estimate's settings are checked only in
    BLOCK mode (a STREAM config carries them unused)."""
    if values["sparse_mode"] not in SPARSE_MODES:
        raise ValueError(f"{where}sparse_mode must be one of {sorted(SPARSE_MODES)}, got {values['sparse_mode']!r}")
    for name, low in (("sink", 0), ("window", 1), ("block_size", 1)):
        val = values[name]
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{where}{name} must be an int >= {low}, got {val!r}")
    if values["sparse_mode"] == "block":
        check_xattn_args(values["block_size"], values["xattn_stride"], values["xattn_threshold"], where=where)


DEFAULT = SparseConfig()
