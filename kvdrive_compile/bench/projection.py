"""A small cost model: per-step bytes and FLOPs of each system, priced on named hardware.

Two uses, both kept apart from measured numbers:
- price the bytes and FLOPs counted in a real run (the runtime's moved bytes and selected
  blocks per tier) on other hardware;
- estimate Llama-3.1-8B at 32K-128K context and batch 8-32 from the same byte model, with the
  tier fractions the placement rule gives (newest KV on the device, then host, then disk).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from tabulate import tabulate

GIB = 2**30

ASSUMPTIONS = [
    "Bytes and FLOPs only: no Python, kernel-launch or synchronisation overhead, which is what "
    "dominates the small models' measured CPU steps; an estimate is a lower bound on step time.",
    "Decode is memory-bound: a device stage takes max(bytes / HBM bandwidth, FLOPs / peak FLOP/s); "
    "every step reads all weights once.",
    "CPU attention reads the host-resident selected KV at cpu_efficiency x DRAM bandwidth, or is "
    "bounded by the CPU's FLOP/s, whichever is slower.",
    "Without overlap the stages run one after the other: device + PCIe (both ways) + SSD + CPU. With "
    "overlap (perfect layer pipelining) the slowest resource bounds the step; PCIe is full duplex.",
    "Placement as the runtime does it: the newest KV on the device tier up to its budget, older on host "
    "up to its budget, the rest on disk; fetch designs keep no KV on the device (device_memory=0).",
    "Sparse selection attends, per sequence and layer, the sink and local window (on the newest tier) "
    "plus top-k blocks spread over the context like the KV is over the tiers; the first dense_layers "
    "layers and sliding-window layers attend everything they keep.",
    "kvdrive moves no selected KV to the device: q goes to the CPU and (out, lse) back per layer; each "
    "new token's KV eventually moves down a tier (device->host, host->disk) once a tier is full.",
    "Hugging Face's offloaded cache copies every layer's KV to the device and back each step; it has no "
    "disk tier. Dense needs all KV plus weights in device memory.",
    "The runtime's counters count KV blocks moved between tiers; they do not count q and (out, lse) "
    "crossing to the CPU, nor a new token written straight into a host block, which the model does.",
    "Bandwidths from DESIGN.md where it gives them (H100 HBM, PCIe 5, DDR5, NVMe gen4, this machine); "
    "the A100 and PCIe 4 figures and all FLOP/s are nominal datasheet-level values.",
]


@dataclass(frozen=True)
class Hardware:
    """A machine: bandwidths in GB/s (1e9 B/s), compute in TFLOP/s, memories in GiB."""

    name: str
    summary: str
    hbm_gbs: float
    device_tflops: float
    pcie_gbs: float
    dram_gbs: float
    cpu_tflops: float
    ssd_gbs: float
    device_gib: float
    host_gib: float
    cpu_efficiency: float = 0.5


PROFILES = {h.name: h for h in (
    Hardware("h100-pcie5-nvme", "H100 80 GB, PCIe 5 x16, DDR5 socket, one NVMe gen4 SSD",
             hbm_gbs=3000, device_tflops=990, pcie_gbs=40, dram_gbs=250, cpu_tflops=3.0, ssd_gbs=6.5,
             device_gib=80, host_gib=512),
    Hardware("a100-pcie4-nvme", "A100 80 GB, PCIe 4 x16, DDR4 socket, one NVMe gen4 SSD",
             hbm_gbs=2000, device_tflops=312, pcie_gbs=20, dram_gbs=150, cpu_tflops=2.0, ssd_gbs=6.5,
             device_gib=80, host_gib=512),
    Hardware("this-cpu", "this project's CPU machine: 2 cores, no GPU (the device tier is host DRAM)",
             hbm_gbs=25, device_tflops=0.1, pcie_gbs=12, dram_gbs=25, cpu_tflops=0.1, ssd_gbs=1.2,
             device_gib=24, host_gib=24),
)}


@dataclass(frozen=True)
class Geometry:
    """What the byte model needs of a model: its attention shape, KV dtype size and parameters."""

    name: str
    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype_bytes: int
    params: float
    sliding_layers: int = 0
    window: int = 0

    @property
    def kv_token_layer(self) -> int:
        """K and V bytes of one token in one layer (all KV heads)."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def kept(self, context: int) -> int:
        """Tokens kept per sequence summed over layers (sliding layers keep their window)."""
        full = self.layers - self.sliding_layers
        return full * context + self.sliding_layers * min(context, self.window or context)

    def kv_bytes(self, context: int, batch: int) -> int:
        return batch * self.kept(context) * self.kv_token_layer

    @classmethod
    def of(cls, name: str, config, dtype_bytes: int, params: float) -> "Geometry":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kinds = getattr(config, "layer_types", None) or []
        return cls(name, config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads,
                   head_dim, dtype_bytes, float(params), sum(k == "sliding_attention" for k in kinds),
                   getattr(config, "sliding_window", None) or 0)


LLAMA_8B = Geometry("llama-3.1-8b", layers=32, kv_heads=8, q_heads=32, head_dim=128, dtype_bytes=2, params=8.03e9)


@dataclass(frozen=True)
class Policy:
    token_budget: Optional[int] = 2048
    block_size: int = 16
    sink: int = 4
    local: int = 64
    dense_layers: int = 2


@dataclass
class StepCounts:
    """Bytes and FLOPs of one decode step of the whole batch, per resource."""

    weight_bytes: float = 0.0
    weight_flops: float = 0.0
    device_attn_bytes: float = 0.0
    device_attn_flops: float = 0.0
    cpu_attn_bytes: float = 0.0
    cpu_attn_flops: float = 0.0
    h2d_bytes: float = 0.0
    d2h_bytes: float = 0.0
    ssd_read_bytes: float = 0.0
    ssd_write_bytes: float = 0.0

    def seconds(self, hw: Hardware) -> dict:
        """Per-resource seconds, and the step with and without overlap, and what bounds it."""
        dev = (_roofline(self.weight_bytes, self.weight_flops, hw.hbm_gbs, hw.device_tflops)
               + _roofline(self.device_attn_bytes, self.device_attn_flops, hw.hbm_gbs, hw.device_tflops))
        cpu = _roofline(self.cpu_attn_bytes, self.cpu_attn_flops, hw.dram_gbs * hw.cpu_efficiency, hw.cpu_tflops)
        h2d, d2h = self.h2d_bytes / (hw.pcie_gbs * 1e9), self.d2h_bytes / (hw.pcie_gbs * 1e9)
        ssd = (self.ssd_read_bytes + self.ssd_write_bytes) / (hw.ssd_gbs * 1e9)
        parts = {"device": dev, "cpu": cpu, "pcie": max(h2d, d2h), "ssd": ssd}
        return {**parts, "serial": dev + cpu + h2d + d2h + ssd, "overlap": max(parts.values()),
                "bound": max(parts, key=parts.get)}


def _roofline(nbytes: float, flops: float, gbs: float, tflops: float) -> float:
    """Seconds of a stage bounded by memory bandwidth or by compute, whichever is slower."""
    return max(nbytes / (gbs * 1e9), flops / (tflops * 1e12))


def _tiers(geo: Geometry, context: int, batch: int, device_kv: float, host_kv: float, own_device: bool) -> dict:
    """Fractions of the KV on each tier (newest first on the device tier, when the design has one)."""
    total = max(1, geo.kv_bytes(context, batch))
    dev = min(1.0, device_kv / total) if own_device else 0.0
    host = min(1.0 - dev, host_kv / total)
    return {"device": dev, "host": host, "disk": max(0.0, 1.0 - dev - host)}


def _attended(geo: Geometry, policy: Policy, context: int, frac: dict, sparse: bool) -> dict:
    """Tokens attended per sequence and step, summed over layers, by the tier they lie on."""
    newest = "device" if frac["device"] > 0 else "host"
    full = geo.layers - geo.sliding_layers
    out = {t: 0.0 for t in frac}
    budget = policy.token_budget if sparse and policy.token_budget else context
    sparse_layers = max(0, full - policy.dense_layers) if budget < context else 0
    exact = (full - sparse_layers) * context
    window = min(budget, policy.sink + policy.local) if sparse_layers else 0
    spread = exact + sparse_layers * (budget - window)
    for t, f in frac.items():
        out[t] += spread * f
    out[newest] += sparse_layers * window + geo.sliding_layers * min(context, geo.window or context)
    return out


def scenario_counts(system: str, geo: Geometry, policy: Policy, context: int, batch: int,
                    device_kv: float, host_kv: float) -> StepCounts:
    """The byte model of one decode step of ``system`` (a name of systems.SYSTEMS)."""
    own_device = system in ("kvdrive", "kvdrive-exact")
    frac = (_tiers(geo, context, batch, device_kv, host_kv, own_device)
            if system not in ("dense", "hf-offload") else {"device": 1.0, "host": 0.0, "disk": 0.0})
    att = _attended(geo, policy, context, frac, sparse=system in ("kvdrive", "sparse-fetch"))
    per_tok, flops_tok = geo.kv_token_layer, 4 * geo.q_heads * geo.head_dim
    sel = {t: batch * n * per_tok for t, n in att.items()}
    new_kv = batch * geo.layers * per_tok                      # this step's new K and V
    c = StepCounts(weight_bytes=geo.params * geo.dtype_bytes, weight_flops=2 * geo.params * batch)
    total_flops = batch * sum(att.values()) * flops_tok
    if system in ("kvdrive", "kvdrive-exact"):
        c.device_attn_bytes, c.cpu_attn_bytes = sel["device"], sel["host"] + sel["disk"]
        share = c.cpu_attn_bytes / max(1.0, sum(sel.values()))
        c.device_attn_flops, c.cpu_attn_flops = total_flops * (1 - share), total_flops * share
        q = batch * geo.layers * geo.q_heads * geo.head_dim if share > 0 else 0     # q down, (out, lse) up
        c.d2h_bytes = q * geo.dtype_bytes + (new_kv if frac["device"] < 1 else 0)
        c.h2d_bytes = q * 4 + (q // geo.head_dim) * 4                                # fp32 out and lse
    else:
        c.device_attn_bytes, c.device_attn_flops = sum(sel.values()), total_flops
        fetched = sel["host"] + sel["disk"]
        c.h2d_bytes = geo.kv_bytes(context, batch) if system == "hf-offload" else fetched
        c.d2h_bytes = {"dense": 0, "hf-offload": geo.kv_bytes(context, batch)}.get(system, new_kv)
    c.ssd_read_bytes = sel["disk"]
    c.ssd_write_bytes = new_kv if frac["disk"] > 0 else 0
    return c


def fits(system: str, geo: Geometry, hw: Hardware, context: int, batch: int, device_kv: float,
         host_kv: float) -> tuple[str, str]:
    """(status, note) of a scenario: "ok", "over budget" or "does not fit", and why."""
    kv = geo.kv_bytes(context, batch)
    weights = geo.params * geo.dtype_bytes
    if system == "dense":
        if kv + weights > hw.device_gib * GIB:
            return "does not fit", f"KV {kv / GIB:.0f} GiB + weights on a {hw.device_gib:.0f} GiB device"
        if kv > device_kv:
            return "over budget", f"KV {kv / GIB:.0f} GiB > device budget {device_kv / GIB:.0f} GiB"
    if system == "hf-offload" and kv > host_kv:
        return "does not fit", f"KV {kv / GIB:.0f} GiB > host budget {host_kv / GIB:.0f} GiB (no disk tier)"
    return "ok", ""


def scenarios(profiles: list[str], geo: Geometry = LLAMA_8B, policy: Policy = Policy(),
              contexts=(32768, 65536, 131072), batches=(8, 16, 32),
              systems=("dense", "hf-offload", "fetch-all", "sparse-fetch", "kvdrive"),
              device_kv_gib: float = 16.0, host_fraction: float = 0.75) -> list[dict]:
    """Estimated step time of every system at every (context, batch) on each hardware profile."""
    rows = []
    for name in profiles:
        hw = PROFILES[name]
        device_kv, host_kv = device_kv_gib * GIB, host_fraction * hw.host_gib * GIB
        for context in contexts:
            for batch in batches:
                for system in systems:
                    c = scenario_counts(system, geo, policy, context, batch, device_kv, host_kv)
                    status, note = fits(system, geo, hw, context, batch, device_kv, host_kv)
                    rows.append(_priced(hw, c, model=geo.name, context=context, batch=batch,
                                        system=system, status=status, note=note, device_kv=device_kv,
                                        host_kv=host_kv))
    return rows


def _priced(hw: Hardware, c: StepCounts, **labels) -> dict:
    """A row: the labels, the counts, the seconds per resource, and tokens/s of the whole batch."""
    t = c.seconds(hw)
    batch = labels["batch"]
    return {"profile": hw.name, **labels, "counts": asdict(c), "seconds": t,
            "tok_s_serial": batch / t["serial"] if t["serial"] else None,
            "tok_s_overlap": batch / t["overlap"] if t["overlap"] else None}


# -- measured runs, priced ---------------------------------------------------------------------

# the measured systems the byte model describes (it has no cache between steps, and a host budget)
MODELLED = ("dense", "fetch-all", "sparse-fetch", "kvdrive", "kvdrive-exact")
SPLIT_SYSTEMS = ("kvdrive", "kvdrive-exact", "kvdrive-host")      # attend host/disk blocks on the CPU


def measured_counts(row: dict, geo: Geometry, block_size: int, steps: int) -> Optional[StepCounts]:
    """A measured row's counted bytes per decode step (None for rows that did not run)."""
    if row.get("status") not in ("ok", "over budget") or not row.get("moved_per_token"):
        return None
    b = row["batch"]
    moved = {k: v * b for k, v in row["moved_per_token"].items()}
    slot = 2 * block_size * geo.head_dim * geo.dtype_bytes               # one (row, block) of K and V
    flops_slot = block_size * 4 * (geo.q_heads // geo.kv_heads) * geo.head_dim
    c = StepCounts(weight_bytes=geo.params * geo.dtype_bytes, weight_flops=2 * geo.params * b,
                   h2d_bytes=moved["host->device"], d2h_bytes=moved["device->host"],
                   ssd_read_bytes=moved["disk->host"], ssd_write_bytes=moved.get("host->disk", 0))
    sel = row.get("selected_blocks")
    if sel:
        per_step = {t: n / max(1, steps) for t, n in sel.items()}
        on_cpu = (per_step["host"] + per_step["disk"]) if row["system"] in SPLIT_SYSTEMS else 0
        c.cpu_attn_bytes, c.cpu_attn_flops = on_cpu * slot, on_cpu * flops_slot
        on_dev = sum(per_step.values()) - on_cpu
        c.device_attn_bytes, c.device_attn_flops = on_dev * slot, on_dev * flops_slot
    else:                                            # eager Hugging Face reads all its KV
        c.device_attn_bytes = row["kv_bytes"]
        c.device_attn_flops = row["kv_bytes"] / geo.kv_token_layer * 4 * geo.q_heads * geo.head_dim
    return c


def price_measured(sweep: dict, profiles: list[str]) -> list[dict]:
    """Each measured row's counted bytes, priced on each profile, next to the measured step."""
    geo = Geometry(**sweep["geometry"])
    steps = sweep["sweep"]["decode_steps"]
    out = []
    for row in sweep["rows"]:
        c = measured_counts(row, geo, sweep["budgets"]["block_size"], steps)
        if c is None:
            continue
        for name in profiles:
            out.append(_priced(PROFILES[name], c, model=sweep["model"], context=row["context"],
                               batch=row["batch"], system=row["system"], status="counted",
                               note="", measured_step_ms=row.get("step_ms_median")))
    return out


def model_check(sweep: dict) -> list[dict]:
    """The byte model against the counted bytes at the measured points (per decoded token)."""
    geo = Geometry(**sweep["geometry"])
    b = sweep["budgets"]
    policy = Policy(b["token_budget"], b["block_size"])
    steps = sweep["sweep"]["decode_steps"]
    out = []
    for row in sweep["rows"]:
        if row.get("status") not in ("ok", "over budget") or row["system"] not in MODELLED:
            continue
        ctx = row["context"] + steps // 2
        c = scenario_counts(row["system"], geo, policy, ctx, row["batch"], b["device_memory"], b["host_memory"])
        frac = (c.device_attn_bytes / max(1.0, c.device_attn_bytes + c.cpu_attn_bytes)
                if row["system"] in ("kvdrive", "kvdrive-exact") else None)
        out.append({"model": sweep["model"], "system": row["system"], "context": row["context"],
                    "batch": row["batch"], "counted": row["moved_per_token"],
                    "modelled": {"host->device": c.h2d_bytes / row["batch"], "device->host": c.d2h_bytes / row["batch"],
                                 "disk->host": c.ssd_read_bytes / row["batch"]},
                    "counted_hit_rate": row.get("device_hit_rate"), "modelled_hit_rate": frac})
    return out


def project(result: Optional[dict], profiles: Optional[list[str]] = None, **scenario_kw) -> dict:
    """The projection section of the results JSON."""
    profiles = list(profiles or [p for p in PROFILES if p != "this-cpu"])
    measured_profiles = profiles + (["this-cpu"] if "this-cpu" not in profiles else [])
    sweeps = [s for s in (result or {}).get("sweeps", []) if s.get("geometry")]
    return {"assumptions": ASSUMPTIONS, "profiles": {p: asdict(PROFILES[p]) for p in measured_profiles},
            "geometry": asdict(LLAMA_8B), "policy": asdict(Policy()),
            "scenarios": scenarios(profiles, **scenario_kw),
            "measured": [r for s in sweeps for r in price_measured(s, measured_profiles)],
            "model_check": [r for s in sweeps for r in model_check(s)]}


# -- tables ------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def scenario_table(rows: list[dict]) -> str:
    head = ["context", "batch", "system", "status", "h2d GiB", "ssd GiB", "CPU-attn GiB", "step ms serial",
            "step ms overlap", "tok/s overlap", "bound"]
    body = [[r["context"], r["batch"], r["system"], r["status"], _gib(r["counts"]["h2d_bytes"]),
             _gib(r["counts"]["ssd_read_bytes"]), _gib(r["counts"]["cpu_attn_bytes"]),
             f"{1e3 * r['seconds']['serial']:.1f}", f"{1e3 * r['seconds']['overlap']:.1f}",
             f"{r['tok_s_overlap']:.0f}", r["seconds"]["bound"]] for r in rows]
    return tabulate(body, headers=head, disable_numparse=True)


def measured_table(rows: list[dict]) -> str:
    head = ["model", "system", "context", "batch", "profile", "step ms serial", "step ms overlap",
            "bound", "measured step ms (its own machine)"]
    body = [[r["model"], r["system"], r["context"], r["batch"], r["profile"], f"{1e3 * r['seconds']['serial']:.2f}",
             f"{1e3 * r['seconds']['overlap']:.2f}", r["seconds"]["bound"],
             "-" if r["measured_step_ms"] is None else f"{r['measured_step_ms']:.0f}"] for r in rows]
    return tabulate(body, headers=head, disable_numparse=True)


def check_table(rows: list[dict]) -> str:
    def kib(x):
        return f"{x / 1024:.1f}"

    head = ["model", "system", "context", "batch", "h2d/tok counted", "modelled", "d2h/tok counted", "modelled",
            "disk->host/tok counted", "modelled", "hit counted", "modelled"]
    body = [[r["model"], r["system"], r["context"], r["batch"],
             kib(r["counted"]["host->device"]), kib(r["modelled"]["host->device"]),
             kib(r["counted"]["device->host"]), kib(r["modelled"]["device->host"]),
             kib(r["counted"]["disk->host"]), kib(r["modelled"]["disk->host"]),
             "-" if r["counted_hit_rate"] is None else f"{r['counted_hit_rate']:.2f}",
             "-" if r["modelled_hit_rate"] is None else f"{r['modelled_hit_rate']:.2f}"] for r in rows]
    return tabulate(body, headers=head, disable_numparse=True)


def text(section: dict) -> str:
    parts = ["== PROJECTION (a cost model, not a measurement)", "assumptions:"]
    parts += [f"  - {a}" for a in section["assumptions"]]
    geo = section["geometry"]
    for name in dict.fromkeys(r["profile"] for r in section["scenarios"]):
        hw = PROFILES[name]
        parts += ["", f"{geo['name']} on {name} ({hw.summary}): token budget {section['policy']['token_budget']}, "
                      f"device KV budget {_gib(section['scenarios'][0]['device_kv'])} GiB, host KV budget "
                      f"{_gib([r for r in section['scenarios'] if r['profile'] == name][0]['host_kv'])} GiB; "
                      "per decode step of the whole batch",
                  scenario_table([r for r in section["scenarios"] if r["profile"] == name])]
    if section["measured"]:
        parts += ["", "the measured points' counted bytes and FLOPs per step, priced on each profile",
                  measured_table(section["measured"])]
    if section["model_check"]:
        parts += ["", "the byte model against the counted bytes at the measured points (KiB per decoded token)",
                  check_table(section["model_check"])]
    return "\n".join(parts)

