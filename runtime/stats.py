"""Counters a user (and the tests) can read after a run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TierStats:
    """What one tier holds now, and the most it ever reserved, in bytes."""

    limit: int | None = None
    resident_bytes: int = 0
    resident_blocks: int = 0
    reserved_bytes: int = 0
    peak_reserved_bytes: int = 0


@dataclass
class RuntimeStats:
    """A snapshot of one runtime: per-tier holdings and bytes moved across each boundary."""

    tiers: dict[str, TierStats] = field(default_factory=dict)
    moved_bytes: dict[str, int] = field(default_factory=dict)
    selected_blocks: dict[str, int] = field(default_factory=dict)     # block reads attended, by tier
    rankings: dict[str, int] = field(default_factory=dict)  # (sequence, KV head) rankings: scored / kept (rerank_similarity)
    served: dict[str, int] = field(default_factory=dict)    # bytes of selected KV, by where it lay when needed
    hit_rate: float = 0.0                                   # the device's share of ``served``
    admitted: dict[str, int] = field(default_factory=dict)  # block copies made, per caching tier
    evicted: dict[str, int] = field(default_factory=dict)   # block copies dropped, per caching tier
    cropped_tokens: int = 0                                 # layer tokens forgotten by crops (rejected draft tokens)
    admission: dict = field(default_factory=dict)           # the admission model's measured inputs and decisions
    disk_cache_bypass: str = ""                             # how disk I/O avoids the page cache
    stage_seconds: dict[str, float] = field(default_factory=dict)     # wall time per graph stage (critical path)
    background_seconds: dict[str, float] = field(default_factory=dict)  # CPU worker and I/O threads' time
    prefetch: dict[str, int] = field(default_factory=dict)  # decode disk misses: landed / in_flight / missed; unused
    prefetch_hit_rate: float = 0.0                          # share of disk misses read ahead of need
    sessions_open: int = 0
    sessions_closed: int = 0
    steps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)
