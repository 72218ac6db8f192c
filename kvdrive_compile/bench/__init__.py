"""The benchmark suite: kvdrive against the peers' designs (dense Hugging Face, its offloaded
cache, FlexGen-like fetch-all, InfiniGen-like sparse fetch, ShadowKV-like and HiSparse-like device
caches of fetched blocks) at the same budgets, with the targets a preset declares, and a cost model
that projects the counted bytes onto named hardware.

    python -m kvdrive_compile.bench --preset cpu
"""
from .cli import add_parser, main
from .presets import PRESETS, Preset, Sweep
from .systems import SYSTEMS

__all__ = ["add_parser", "main", "PRESETS", "Preset", "Sweep", "SYSTEMS"]
