"""Which copies of KV blocks the device (and host) tier keeps between decode steps.

Placeholder: the constants the options validate against. The policy lands here.
"""
from __future__ import annotations

CACHE_POLICIES = ("attention", "lru", "none")
DEFAULT_REUSE_WINDOW = 4
