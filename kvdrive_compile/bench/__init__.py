"""The benchmark suite: kvdrive against the peers' designs (dense Hugging Face, its offloaded
cache, FlexGen-like fetch-all, InfiniGen/ShadowKV-like sparse fetch) at the same budgets, and a
cost model that projects the counted bytes onto named hardware.

    python -m kvdrive_compile.bench --preset cpu
"""
from .cli import add_parser, main
from .presets import PRESETS, Preset, Sweep
from .systems import SYSTEMS

__all__ = ["add_parser", "main", "PRESETS", "Preset", "Sweep", "SYSTEMS"]
