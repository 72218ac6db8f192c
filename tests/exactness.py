"""Shared helpers of the exactness tests: compile a Hugging Face model's forward with kvdrive,
generate greedily, compare with eager."""
from __future__ import annotations

import gc

import torch

import kvdrive_compile


def compiled_copy_forward(model, **options):
    """Compile ``model.forward`` with kvdrive (the model keeps its eager forward as ``eager``)."""
    eager = model.forward
    model.forward = torch.compile(eager, backend="kvdrive", options=options)
    return eager


@torch.no_grad()
def greedy_both(model, ids, new_tokens, attention_mask=None, **options):
    """(eager tokens, kvdrive tokens) of greedy generation; restores the eager forward.

    Exact attention (``token_budget=None``) unless the caller passes a budget."""
    options.setdefault("token_budget", None)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    ref = model.generate(ids, **kw)
    eager = compiled_copy_forward(model, **options)
    try:
        out = model.generate(ids, **kw)
    finally:
        model.forward = eager
    return ref, out


def open_sessions() -> int:
    gc.collect()
    return kvdrive_compile.collect()


def assert_budgets_respected() -> None:
    for st in kvdrive_compile.all_stats():
        for name, tier in st.tiers.items():
            if tier.limit is not None:
                assert tier.peak_reserved_bytes <= tier.limit, (name, tier)
