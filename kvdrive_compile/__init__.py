"""kvdrive-compile: a torch.compile backend that keeps the KV cache in three tiers
(device, host DRAM, disk) and attends it with a scheduled graph of custom ops.

    model.compile(backend="kvdrive", options={"device_memory": "256MiB", "host_memory": "1GiB"})
    model.generate(input_ids, max_new_tokens=64)        # Hugging Face, unchanged
"""
from .backend import compile, counters, kvdrive_backend
from .options import KVDriveOptions, parse_options, parse_size
from .runtimes import all_stats, collect, flush_traces, materialize, release_all, stats

__all__ = ["compile", "kvdrive_backend", "counters", "KVDriveOptions", "parse_options", "parse_size",
           "stats", "all_stats", "release_all", "collect", "materialize",
           "flush_traces"]
