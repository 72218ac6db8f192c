"""The main job: SmolLM2-135M compiled with the kvdrive backend, generating from a long prompt
with budgets small enough that the device tier, host DRAM and disk all hold KV.

    python examples/demo.py [--tokens 3200] [--new 24] [--device-memory 24MiB] [--host-memory 48MiB]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
from tabulate import tabulate
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import kvdrive_compile
from kvdrive_compile import models
from kvdrive_compile.prompts import passkey_prompt


class TimingStreamer(BaseStreamer):
    """Records when the prompt went in and when each new token came out."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate(model, ids, new_tokens: int):
    cache = DynamicCache(config=model.config)
    streamer = TimingStreamer()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache=cache, streamer=streamer)
    first = streamer.times[1] - t0                   # prefill + first token
    decode = streamer.times[-1] - streamer.times[1]
    return out, cache, first, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3200, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=24, help="tokens to generate")
    ap.add_argument("--device-memory", default="24MiB")
    ap.add_argument("--host-memory", default="48MiB")
    args = ap.parse_args()

    torch.manual_seed(0)
    print("loading SmolLM2-135M-Instruct (GGUF, dequantised to fp32)...")
    model, tok = models.load("smollm2-135m")
    text, key = passkey_prompt(tok, args.tokens)
    ids = tok(text, return_tensors="pt").input_ids
    ref, ref_cache, ref_first, ref_decode = generate(model, ids, args.new)    # eager HF, all KV in memory
    del ref_cache
    # exact attention (the default budget would attend 1,024 of the prompt's tokens per step):
    # the demo shows that the three tiers change nothing
    options = {"device_memory": args.device_memory, "host_memory": args.host_memory, "token_budget": None}
    model.forward = torch.compile(model.forward, backend="kvdrive", options=options)
    print(f"prompt: {ids.shape[1]} tokens; kvdrive options {options}")

    t0 = time.perf_counter()
    _, cache, _, _ = generate(model, ids, 2)                 # compiles the prefill and decode graphs
    compile_s = time.perf_counter() - t0
    del cache
    gc.collect()

    out, cache, first, decode = generate(model, ids, args.new)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    stats = kvdrive_compile.stats()
    print(f"\ngenerated: {answer!r}   (the pass key is {key}: {'found' if key in answer else 'not found'})")
    print(f"tokens identical to eager Hugging Face: {torch.equal(out, ref)}\n")
    rows = [["prefill (prompt + first token)", f"{ids.shape[1] / first:,.0f} tok/s", f"{first:.2f} s",
             f"{ids.shape[1] / ref_first:,.0f} tok/s"],
            ["decode", f"{(args.new - 1) / decode:,.2f} tok/s", f"{decode:.2f} s",
             f"{(args.new - 1) / ref_decode:,.2f} tok/s"],
            ["first run (compile + run)", "", f"{compile_s:.1f} s", ""]]
    print(tabulate(rows, headers=["phase", "kvdrive", "time", "eager HF (all KV in RAM)"]))
    tiers = [[name, t.resident_blocks, f"{t.resident_bytes / 2**20:.1f} MiB",
              "-" if t.limit is None else f"{t.limit / 2**20:.0f} MiB",
              f"{t.peak_reserved_bytes / 2**20:.1f} MiB" if t.limit is not None else "-"]
             for name, t in stats.tiers.items()]
    print()
    print(tabulate(tiers, headers=["tier", "KV blocks", "KV bytes", "budget", "peak reserved"]))
    moved = [[k, f"{v / 2**20:.1f} MiB"] for k, v in stats.moved_bytes.items()]
    print()
    print(tabulate(moved, headers=["moved", "bytes (both runs)"]))
    del cache
    kvdrive_compile.release_all()


if __name__ == "__main__":
    main()
