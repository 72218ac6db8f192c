"""What a benchmark run covers: sweeps of (context, batch) points per model, with the device,
host and token budgets fixed per sweep, and named presets of them."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

K = 1024
OPS = (">=", "<=")


@dataclass(frozen=True)
class Target:
    """A claim a sweep's rows are checked against at each of its points (computed in the report,
    never asserted): ``metric`` of ``system``'s row, divided by the same metric of ``versus``'s row
    when ``versus`` is given, compared by ``op`` with ``bound``.

    metric: row keys summed; ``"a.b"`` reads ``row["a"]["b"]`` (``"moved_per_token.disk->host"``).
    versus: a system, or a tuple of them meaning the strongest of those that ran at the point (the
    largest value for ``>=``, the smallest for ``<=``: "faster than the faster of dense and
    dense-compiled"); the report names the one it was. from_point: (context, batch) the target
    starts at: points of a smaller context or batch are not checked. unit: how the metric prints
    ("share", "bytes", "tok/s", "ms"). means: one line, printed."""

    system: str
    metric: tuple[str, ...]
    op: str
    bound: float
    versus: Optional[Union[str, tuple[str, ...]]] = None
    unit: str = ""
    means: str = ""
    from_point: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"Target op {self.op!r}: choose one of {OPS}")

    @property
    def label(self) -> str:
        what = " + ".join(m.split(".", 1)[-1] for m in self.metric)
        what = f"({what})" if len(self.metric) > 1 else what
        where = "" if self.from_point is None else f" at >= {self.from_point[0]}x{self.from_point[1]}"
        if self.versus is None:
            return f"{self.system} {what} {self.op} {self.bound:g}{where}"
        return f"{self.system} {what} / {versus_label(self.versus)}'s {self.op} {self.bound:g}x{where}"

    def as_dict(self) -> dict:
        versus = list(self.versus) if isinstance(self.versus, tuple) else self.versus
        point = None if self.from_point is None else list(self.from_point)
        return {**asdict(self), "metric": list(self.metric), "versus": versus, "from_point": point,
                "label": self.label}


def versus_label(versus) -> str:
    """How a target's ``versus`` reads: a name, or "best of (a, b)"."""
    return versus if isinstance(versus, str) else f"best of ({', '.join(versus)})"


@dataclass(frozen=True)
class Sweep:
    """One model over ``contexts`` x ``batches``, every system at the same budgets.

    device_fraction, host_fraction: the device and host KV budgets as fractions of the dense KV
    of the sweep's largest point (so the largest points spill to disk). token_budget: tokens
    attended per KV head and step by the sparse systems. reuse_window: the kvdrive rows'
    ``reuse_window`` option (None: the runtime's default; designs that fix their own keep it).
    targets: what the report checks the rows against (``Target``). budget_per_point: the device
    and host budgets are fractions of each point's own dense KV instead (every point under the
    same pressure; each system compiles once per point). prefill_tokens: at most this many
    prompt tokens (whole batch) per prefill call; longer prompts go in chunks through the same
    cache (None: as many as the free memory holds, ``runner.prefill_chunk``). systems: the
    systems this sweep runs of the preset's (None: all; ``--systems`` runs its choice on every sweep).
    """

    model: str
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    token_budget: int
    decode_steps: int = 8
    device_fraction: float = 0.25
    host_fraction: float = 0.5
    block_size: int = 16
    leave_out: tuple[tuple[int, int], ...] = ()     # (context, batch) points of the grid not run
    reuse_window: Optional[int] = None
    targets: tuple[Target, ...] = ()
    budget_per_point: bool = False
    prefill_tokens: Optional[int] = None
    systems: Optional[tuple[str, ...]] = None

    @property
    def points(self) -> list[tuple[int, int]]:
        """(context, batch) in the order they run: small to large."""
        return [(c, b) for c in self.contexts for b in self.batches if (c, b) not in self.leave_out]


@dataclass(frozen=True)
class Preset:
    name: str
    covers: str                        # one line, printed with the results
    sweeps: tuple[Sweep, ...] = ()
    device: str = "cpu"                # "cpu" or "cuda"
    dtype: str = "float32"
    time_budget_s: Optional[float] = None   # points left when it is spent are rows saying so
    project: bool = False              # add the projection section
    systems: Optional[tuple[str, ...]] = None   # default: systems.DEFAULT_SYSTEMS
    # CPU threads for torch and numba (None: their defaults). One on the shared 2-core machine: with
    # two, every parallel op waits for a core another process holds, and steps swing 2-15x
    threads: Optional[int] = None
    # a row the shared machine disturbed is measured once more (a whole point: at 8K tokens the
    # prefill alone is minutes on one thread, so the disk preset does not)
    second_try: bool = True
    trace: bool = False                # every kvdrive system writes its timeline (and the report summarizes it)

    def as_dict(self) -> dict:
        return asdict(self)


# what the pipeline preset checks (the overlapped pipeline issue's targets)
OVERLAP_TARGETS = (
    Target("kvdrive", ("pipeline.wall_over_slowest_stage",), "<=", 1.2, unit="x",
           means="a decode step's wall time <= 1.2x its slowest stage's (from the timeline)"),
    Target("kvdrive", ("pipeline.disk_read_hidden",), ">=", 0.5, unit="share",
           means=">= 50 % of the disk-read time hidden under other work (from the timeline)"),
)

# dense Hugging Face at its fastest: eager, or compiled by Inductor on a static cache
DENSE_BEST = ("dense", "dense-compiled")

PIPELINE_TARGETS = (
    Target("kvdrive-default", ("decode_tok_s",), ">=", 1.5, versus=DENSE_BEST, unit="tok/s",
           means="kvdrive with its default options decodes >= 1.5x the faster of dense Hugging Face's, eager or "
                 "compiled, at 8K x 4"),
    Target("kvdrive", ("decode_tok_s",), ">=", 1.5, versus=DENSE_BEST, unit="tok/s",
           means="kvdrive with a quarter of the KV on the device tier and a quarter on disk, the same"),
    *OVERLAP_TARGETS,
)

# what the disk preset checks: KVDrive's paper's claims at its 6.25 % budget point, on our runtime
DISK_TARGETS = (
    Target("kvdrive", ("hit_rate",), ">=", 0.80, unit="share",
           means="the device tier served >= 80 % of the selected KV bytes over the timed steps"),
    Target("kvdrive", ("moved_per_token.disk->host", "moved_per_token.host->device"), "<=", 0.30,
           versus="sparse-fetch", unit="bytes",
           means="KV read up the hierarchy per decoded token <= 30 % of sparse-fetch's (no reuse)"),
    Target("kvdrive", ("decode_tok_s",), ">=", 1.74, versus="shadowkv-like", unit="tok/s",
           means="decode throughput >= 1.74x ShadowKV-like's (the same block estimates, ranked by them alone; reuse of the last step only)"),
    Target("kvdrive", ("step_ms_median",), "<=", 1.3, versus="kvdrive-host", unit="ms",
           means="median step with the disk tier <= 1.3x the same run with all spilled KV in host memory"),
    *OVERLAP_TARGETS,
)

# the designs the targets compare, and HiSparse-like. Each costs a compile (~45 s) and an 8K x 2
# prefill (~145-175 s on one thread of this machine) before its 16 steps: ~4 min a system, ~20 min
# in all. dense (~2.5 min) and fetch-all (~4.5 min) are one --systems away
DISK_SYSTEMS = ("sparse-fetch", "shadowkv-like", "hisparse-like", "kvdrive", "kvdrive-host")
DISK_TIME_BUDGET_S = 1800.0         # a cap: a system not started by then is a "skipped" row

# what the gpu-8b preset checks (issue 16's targets), where memory is short: 64K-128K x batch >= 8
GPU8B_TARGETS = (
    Target("kvdrive", ("decode_tok_s",), ">=", 1.74, versus="shadowkv-like", unit="tok/s", from_point=(64 * K, 8),
           means="decode throughput >= 1.74x ShadowKV-like's (KVDrive's paper's best over its best baseline)"),
    Target("kvdrive", ("decode_tok_s",), ">=", 3.0, versus="hf-offload", unit="tok/s", from_point=(64 * K, 8),
           means="decode throughput >= 3x Hugging Face's offloaded cache's"),
    Target("kvdrive", ("hit_rate",), ">=", 0.80, unit="share", from_point=(64 * K, 8),
           means="the device tier served >= 80 % of the selected KV bytes over the timed steps"),
)
GPU8B_SYSTEMS = ("dense", "dense-compiled", "hf-offload", "fetch-all", "sparse-fetch", "shadowkv-like",
                 "hisparse-like", "kvdrive")
GPU8B_GRID = ((32 * K, 64 * K, 128 * K), (4, 8, 16))


def grid_except(grid: tuple[tuple[int, ...], tuple[int, ...]],
                keep: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The ``leave_out`` of a grid that runs only the ``keep`` points."""
    contexts, batches = grid
    return tuple((c, b) for c in contexts for b in batches if (c, b) not in keep)


def gpu_8b_sweep(model: str) -> Sweep:
    """One 8B model of the gpu-8b preset (see the preset's comment for the points it runs)."""
    return Sweep(model, *GPU8B_GRID, token_budget=2048, decode_steps=8, device_fraction=0.25, host_fraction=0.5,
                 leave_out=grid_except(GPU8B_GRID, ((32 * K, 4), (64 * K, 8))), targets=GPU8B_TARGETS,
                 budget_per_point=True)


# what the gpu-8b-smoke preset runs: each code path gpu-8b takes once, in about a minute on 2 cores.
# Every compiled system costs a compile (Dynamo traces the model: ~6 s a graph on this machine,
# three graphs with a chunked prefill; Inductor ~25-45 s), so the designs that differ from
# kvdrive only by its options (shadowkv-like, hisparse-like: the disk preset runs them) are one
# --systems away but sparse-fetch (kvdrive's selection, fetched: the same tokens), and Qwen3 runs
# the reference and kvdrive only
GPU8B_SMOKE_SYSTEMS = ("dense", "dense-compiled", "hf-offload", "fetch-all", "sparse-fetch", "kvdrive")


def gpu_8b_smoke_sweep(model: str, systems: Optional[tuple[str, ...]] = None) -> Sweep:
    """A tiny model of the same architecture, one CPU point: the gpu-8b code path in seconds,
    the prompt prefilled in two chunks (``prefill_tokens``). A quarter of the KV holds the blocks
    the runtime keeps on the device (sink, local window, open block: 6 of 32 per row and layer)
    and a few more."""
    return Sweep(model, (512,), (2,), token_budget=128, decode_steps=3, device_fraction=0.25, host_fraction=0.5,
                 targets=GPU8B_TARGETS, budget_per_point=True, prefill_tokens=512, systems=systems)


PRESETS = {p.name: p for p in (
    # the device budget is 45 % of the KV here: at 256 tokens the blocks the runtime pins on the
    # device (sink, local window, open block: 6 of 16 per row and layer) are 37.5 % of it
    Preset("smoke", "CI: SmolLM2-135M, one 256-token point at batch 2, 4 decode steps, one CPU thread: dense, "
                    "hf-offload and kvdrive (the other designs run in gpu-8b-smoke)",
           (Sweep("smollm2-135m", (256,), (2,), token_budget=96, decode_steps=4, device_fraction=0.45,
                  host_fraction=0.3),),
           systems=("dense", "hf-offload", "kvdrive"), threads=1),
    Preset("cpu", "SmolLM2-135M fp32 at 1K and 2K tokens x batch 1 and 4, 8 decode steps, one CPU thread "
                  "(a CPU-sized slice of the GPU sweep; the device tier is host memory here)",
           (Sweep("smollm2-135m", (1 * K, 2 * K), (1, 4), token_budget=256),),
           time_budget_s=540, threads=1),
    Preset("full-cpu", "SmolLM2-135M 2K/4K/8K x batch 1/4/16 and Gemma 3 270M 8K/16K/32K x batch 1/4, "
                       "fp32 on the CPU, one thread (hours on 2 cores)",
           (Sweep("smollm2-135m", (2 * K, 4 * K, 8 * K), (1, 4, 16), token_budget=512),
            Sweep("gemma3-270m", (8 * K, 16 * K, 32 * K), (1, 4), token_budget=1024)), threads=1),
    Preset("gpu", "SmolLM2-135M 2K/4K/8K x batch 1/4/16 and Gemma 3 270M 8K/16K/32K x batch 1/4, "
                  "bf16 on one GPU, 8 decode steps",
           (Sweep("smollm2-135m", (2 * K, 4 * K, 8 * K), (1, 4, 16), token_budget=512),
            Sweep("gemma3-270m", (8 * K, 16 * K, 32 * K), (1, 4), token_budget=1024)),
           device="cuda", dtype="bfloat16", time_budget_s=420, project=True),
    Preset("disk", "SmolLM2-135M fp32 at 8K tokens x batch 2, token budget 512 (6.25 %), device 15 % and host "
                   "35 % of the KV (the rest on disk), 16 decode steps, one CPU thread: the tier-caching "
                   "designs side by side, and the targets (~20 min on 2 cores)",
           (Sweep("smollm2-135m", (8 * K,), (2,), token_budget=512, decode_steps=16, device_fraction=0.15,
                  host_fraction=0.35, targets=DISK_TARGETS),),
           systems=DISK_SYSTEMS, time_budget_s=DISK_TIME_BUDGET_S, threads=1, second_try=False, trace=True),
    # the overlapped pipeline against dense Hugging Face at the point: both use the machine's
    # two cores (torch's and numba's default threads), kvdrive's CPU part on its worker thread
    Preset("pipeline", "SmolLM2-135M fp32 at 8K tokens x batch 4, the default token budget (1,024), 8 decode "
                       "steps, default CPU threads: dense Hugging Face, eager and compiled by Inductor on a static "
                       "cache; kvdrive with its default options (no tier limits); kvdrive with device 25 % and "
                       "host 50 % of the KV (the rest on disk), its timeline summarized (~25 min on 2 cores)",
           (Sweep("smollm2-135m", (8 * K,), (4,), token_budget=1024, decode_steps=8, targets=PIPELINE_TARGETS),),
           systems=("dense", "dense-compiled", "kvdrive-default", "kvdrive"), second_try=False, trace=True),
    # Llama-3.1-8B and Qwen3-8B shapes, random bf16 weights made on the GPU (nothing downloaded or
    # carried), on one H200 (141 GB HBM; its machine: 128 GiB RAM, 64 GiB disk).
    # Memory: KV is 128 KiB per token for Llama (32 layers x 8 KV heads x 128 x K and V x 2 B), 144
    # KiB for Qwen3 (36 layers): 16 GiB at 32K x 4, 64 GiB at 64K x 8 / 32K x 16 / 128K x 4, 128
    # GiB at 64K x 16 and 128K x 8, 256 GiB at 128K x 16. The last three cannot run: their homes
    # (host budget + disk) or Hugging Face's offloaded cache (all KV in RAM) need more than the
    # 128 GiB of RAM and 64 GiB of disk. The budgets are per point: device 25 % of the point's KV,
    # host 50 %, the rest (25 %) on disk, so every point spills to disk (8 GiB at 32K x 4, 16 at
    # 64K x 8 for Llama), and dense (all KV on the device) runs past its budget as the reference.
    # Time, estimated (no GPU has run this preset yet): a prefill is ~2 x 8e9 FLOPs a token plus
    # attention's 4 x layers x 4096 x context/2 a token: 32K x 4 ~3e15 FLOPs (~6 s for eager
    # Hugging Face at ~500 TFLOP/s), 64K x 8 ~1.7e16 (~35 s), 128K x 4 ~2.6e16 (~55 s); decode steps
    # are 0.1-1 s. Model creation ~10 s each; each compiled system compiles once per point (30-60 s
    # for an 8B model's graphs). So eight systems x two models fit 32K x 4 and 64K x 8 at most in 8
    # minutes (64K x 8 is the targets' point; --contexts/--batches run others, e.g. --contexts 131072
    # --batches 4, with --time-budget). The kvdrive designs' prefill attends the new tokens on the
    # device in fp32 matmuls of 256 MiB score chunks (runtime/block_attention.py): at these shapes
    # that is 2K-16K chunks a layer, likely minutes a prefill, so the 7-minute budget of points
    # decides what runs: dense, hf-offload, kvdrive and shadowkv-like go first, and a point not
    # started when it is spent, or that the same system's last point (scaled) says would end after
    # it, is a row saying so.
    Preset("gpu-8b", "Llama-3.1-8B and Qwen3-8B shapes with random bf16 weights (made on the GPU, nothing "
                     "downloaded) on one GPU: 32K x 4 and 64K x 8 (of 32K/64K/128K x 4/8/16: --contexts/--batches), "
                     "device 25 % and host 50 % of each point's KV (the rest on disk), token budget 2048, 8 decode "
                     "steps, dense (eager and compiled) and the offloaded and tiered designs; ~8 min on an H200",
           (gpu_8b_sweep("llama3.1-8b-random"), gpu_8b_sweep("qwen3-8b-random")),
           systems=GPU8B_SYSTEMS, device="cuda", dtype="bfloat16", time_budget_s=420),
    Preset("gpu-8b-smoke", "the gpu-8b code path on the CPU: tiny Llama-3.1 and Qwen3 shapes (4 layers, hidden 256, "
                           "random fp32 weights), one 512-token point at batch 2 prefilled in two chunks, 3 decode "
                           "steps, one CPU thread; dense, dense-compiled, hf-offload, fetch-all, sparse-fetch and "
                           "kvdrive on Llama, dense and kvdrive on Qwen3 (--systems: any gpu-8b system on both)",
           (gpu_8b_smoke_sweep("llama3.1-tiny-random"), gpu_8b_smoke_sweep("qwen3-tiny-random", ("dense", "kvdrive"))),
           systems=GPU8B_SMOKE_SYSTEMS, threads=1, second_try=False),
    Preset("projection", "no model run: the cost model's estimates for Llama-3.1-8B on named hardware",
           project=True),
)}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]


def kv_bytes(config, context: int, batch: int, dtype: torch.dtype) -> int:
    """Dense KV bytes of ``batch`` sequences of ``context`` tokens (sliding layers keep their window)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    tokens = sum(min(context, window) if kind == "sliding_attention" and window else context for kind in kinds)
    per_token_layer = 2 * config.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return batch * tokens * per_token_layer


@dataclass(frozen=True)
class Budgets:
    """The byte and token budgets every system of a sweep runs under."""

    device_memory: int
    host_memory: int
    token_budget: int
    block_size: int
    largest_kv: int = 0
    reuse_window: Optional[int] = None      # the sweep's, for the designs that take it from there

    def as_dict(self) -> dict:
        return asdict(self)


def budgets_for(sweep: Sweep, config, dtype: torch.dtype, point: Optional[tuple[int, int]] = None) -> Budgets:
    """Device and host KV budgets from the dense KV of the sweep's largest point (of ``point``,
    where given: a ``budget_per_point`` sweep's)."""
    largest = max(kv_bytes(config, c, b, dtype) for c, b in ([point] if point else sweep.points))
    align = 1 << 20
    device = max(align, int(largest * sweep.device_fraction) // align * align)
    host = max(align, int(largest * sweep.host_fraction) // align * align)
    return Budgets(device, host, sweep.token_budget, sweep.block_size, largest, sweep.reuse_window)
