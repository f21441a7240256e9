"""Configuration dataclasses. `NSAConfig` holds the NSA hyper-parameters and validates them once,
when constructed, so every op can trust it."""
from __future__ import annotations

import dataclasses


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"NSAConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"NSAConfig.{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters (notation of nsa_spec.md: l, d, l', n, w).

    The defaults are the paper's: compression blocks of l=32 tokens every d=16 tokens, selection
    blocks of l'=64 tokens, n=16 selected blocks of which block 0 and the current and previous
    block are always chosen, and a sliding window of w=512 keys ([t - w + 1, t]).
    """

    compress_block: int = 32  # l: tokens per compressed token
    compress_stride: int = 16  # d: stride between compressed tokens (d | l, d | l')
    select_block: int = 64  # l': tokens per selection block
    num_selected: int = 16  # n: selected blocks per query, forced ones included
    num_init_blocks: int = 1  # leading blocks always selected
    num_local_blocks: int = 2  # current block and the ones before it, always selected
    window: int = 512  # w: sliding-window keys, the query's own token included

    def __post_init__(self):
        _require_int("compress_block", self.compress_block, 1)
        _require_int("compress_stride", self.compress_stride, 1)
        _require_int("select_block", self.select_block, 1)
        _require_int("num_selected", self.num_selected, 1)
        _require_int("num_init_blocks", self.num_init_blocks, 0)
        _require_int("num_local_blocks", self.num_local_blocks, 0)
        _require_int("window", self.window, 1)
        l, d, lp = self.compress_block, self.compress_stride, self.select_block
        if l % d:
            raise ValueError(
                f"NSAConfig.compress_stride (d={d}) must divide compress_block (l={l}): compressed "
                "tokens are built from whole stride-d chunks")
        if lp % d:
            raise ValueError(
                f"NSAConfig.compress_stride (d={d}) must divide select_block (l'={lp}): block "
                "scores map compressed tokens onto selection blocks chunk by chunk")
        forced = self.num_init_blocks + self.num_local_blocks
        if self.num_selected < forced:
            raise ValueError(
                f"NSAConfig.num_selected (n={self.num_selected}) must be >= num_init_blocks + "
                f"num_local_blocks = {forced}: forced blocks count toward n")

    def num_compressed(self, length: int) -> int:
        """Compressed tokens of one unpacked sequence of `length` tokens."""
        l, d = self.compress_block, self.compress_stride
        return 0 if length < l else (length - l) // d + 1

    def num_blocks(self, length: int) -> int:
        """Selection blocks covering `length` tokens (the last one may be partial)."""
        return -(-length // self.select_block)
