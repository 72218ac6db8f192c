"""Runs every method over the same prompts and records what each generated.

A method is dense Hugging Face, or the model's forward compiled with kvdrive at some options.
Samples are made once per (model, length) and shared by all methods; each method compiles
once and runs all lengths, and Dynamo is reset after it so compiled code never piles up.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from tqdm import tqdm
from transformers import DynamicCache

import kvdrive_compile

from .. import models
from .config import EvalConfig
from .tasks import PERPLEXITY, Continuation, Sample, make_continuation, make_sample, score

log = logging.getLogger(__name__)

METHODS = ("dense", "kvdrive-exact", "kvdrive", "window")


@dataclass(frozen=True)
class Method:
    """``dense`` (eager Hugging Face), ``kvdrive-exact``, or ``kvdrive``/``window`` at a token budget."""

    kind: str
    budget: Optional[int] = None
    extra: tuple = ()                    # more kvdrive options, (name, value) pairs
    note: str = ""                       # what ``extra`` says, for the label

    @property
    def label(self) -> str:
        base = self.kind if self.budget is None else f"{self.kind}@{self.budget}"
        return f"{base} [{self.note}]" if self.note else base

    @property
    def options(self) -> Optional[dict]:
        """The kvdrive ``options=`` of this method; None for dense (not compiled)."""
        if self.kind == "dense":
            return None
        if self.kind == "kvdrive-exact":
            return {"token_budget": None, **dict(self.extra)}
        if self.kind == "kvdrive":
            return {"token_budget": self.budget, **dict(self.extra)}
        return {"token_budget": self.budget, "selection": "window"}


def methods_for(kinds: list[str], budgets: list[int], extra: Optional[dict] = None, note: str = "") -> list[Method]:
    """Dense first (the perplexity reference), then exact, then each budgeted kind per budget;
    the kvdrive kinds with the options ``extra``, labelled with ``note``."""
    unknown = sorted(set(kinds) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; methods are {list(METHODS)}")
    mine = {"extra": tuple(sorted((extra or {}).items())), "note": note}
    out = []
    for kind in METHODS:
        if kind not in kinds:
            continue
        more = mine if kind.startswith("kvdrive") else {}
        out += [Method(kind, **more)] if kind in ("dense", "kvdrive-exact") else [Method(kind, b, **more) for b in budgets]
    return out


def kvdrive_extra(config: EvalConfig, model_config, dtype: torch.dtype, lengths: list[int]) -> tuple[dict, str]:
    """The options ``config`` adds to the kvdrive methods for a model and the note that labels
    them (``methods_for``'s extra and note): its ``kvdrive_options``, and with ``tiers`` the
    device and host budgets as fractions of the KV of the longest prompt (in ``dtype``)."""
    extra = dict(config.kvdrive_options)
    notes = [f"{k}={v}" for k, v in sorted(extra.items())]
    if config.tiers is not None:
        from ..bench.presets import kv_bytes
        kv = kv_bytes(model_config, max(lengths), 1, dtype)
        device, host = config.tiers
        extra.update(device_memory=int(device * kv), host_memory=int(host * kv))
        notes.insert(0, f"tiers {device:g}/{host:g}")
    return extra, ", ".join(notes)


@contextmanager
def compiled(model, method: Method) -> Iterator[None]:
    """``model.forward`` compiled for ``method`` inside the block; eager (and Dynamo reset) after."""
    if method.options is None:
        yield
        return
    eager = model.forward
    model.forward = torch.compile(eager, backend="kvdrive", options=method.options)
    try:
        yield
    finally:
        model.forward = eager
        torch._dynamo.reset()
        kvdrive_compile.release_all()


def _step(model, ids: list[int], cache) -> torch.Tensor:
    """Logits of the last position: [vocab] fp32."""
    x = torch.tensor([ids], dtype=torch.long)
    if len(ids) > 1:
        torch._dynamo.maybe_mark_dynamic(x, 1)      # one prefill graph for every prompt length
    return model(x, cache=cache, logits_to_keep=1).logits[0, -1].float()


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, done: Callable[[list[int]], bool]) -> list[int]:
    """Greedy tokens after the prompt ``ids``: prefill, then one decode step per token.

    Stops at end-of-sequence, at ``max_new_tokens``, or once ``done(tokens)``.
    """
    cache = DynamicCache(config=model.config)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out: list[int] = []
    logits = _step(model, ids, cache)
    while True:
        token = int(logits.argmax())
        out.append(token)
        if token in eos or len(out) >= max_new_tokens or done(out):
            return out
        logits = _step(model, [token], cache)


@torch.no_grad()
def teacher_forced(model, prefix: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-probabilities of decode steps fed ``continuation[:-1]`` after a prefill of ``prefix``.

    Returns [len(continuation) - 1, vocab] fp32 log-softmax; row i predicts continuation[i + 1].
    The prefill's own prediction is left out: selection acts on decode steps only.
    """
    cache = DynamicCache(config=model.config)
    _step(model, prefix, cache)
    rows = [torch.log_softmax(_step(model, [token], cache), -1) for token in continuation[:-1]]
    return torch.stack(rows)


def agreement(logprobs: torch.Tensor, reference: torch.Tensor, targets: list[int]) -> dict:
    """Perplexity of ``targets``, top-1 match rate and mean KL(reference || logprobs).

    logprobs, reference: [steps, vocab] fp32 log-softmax; targets: [steps] token ids.
    """
    nll = -logprobs[torch.arange(len(targets)), torch.tensor(targets)].mean().item()
    top1 = (logprobs.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
    return {"ppl": math.exp(nll), "top1_agreement": top1, "kl": max(kl, 0.0)}


def run_sample(model, tokenizer, sample: Sample) -> dict:
    ids = tokenizer(sample.prompt).input_ids
    t0 = time.perf_counter()
    tokens = greedy(model, ids, sample.max_new_tokens,
                    lambda toks: score(sample.answers, tokenizer.decode(toks)) == 1.0)
    generated = tokenizer.decode(tokens, skip_special_tokens=True)
    return {"task": sample.task, "index": sample.index, "prompt_tokens": len(ids),
            "question": sample.prompt[-240:], "expected": list(sample.answers), "generated": generated,
            "new_tokens": len(tokens), "score": score(sample.answers, generated),
            "seconds": time.perf_counter() - t0, "info": sample.info}


def run_continuation(model, item: Continuation, reference: torch.Tensor) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    logprobs = teacher_forced(model, item.prefix, item.continuation)
    record = {"task": PERPLEXITY, "index": item.index, "prompt_tokens": len(item.prefix),
              "steps": len(item.continuation) - 1, "start": item.start,
              **agreement(logprobs, reference if reference is not None else logprobs, item.continuation[1:]),
              "seconds": time.perf_counter() - t0}
    return record, logprobs


def make_work(tokenizer, config: EvalConfig, lengths: list[int]) -> dict[int, list]:
    """Per length: every task's samples, then the perplexity slices (if asked for)."""
    work = {}
    for length in lengths:
        items: list = [make_sample(task, tokenizer, length, i, config.samples, config.seed)
                       for task in config.tasks if task != PERPLEXITY for i in range(config.samples)]
        if PERPLEXITY in config.tasks:
            items += [make_continuation(tokenizer, length, i, config.steps, config.seed)
                      for i in range(config.samples)]
        work[length] = items
    return work


def dense_references(model, work: dict[int, list]) -> dict[tuple[int, int], torch.Tensor]:
    """Dense log-probabilities of every perplexity slice, by (length, index): KL's reference."""
    return {(length, item.index): teacher_forced(model, item.prefix, item.continuation)
            for length, items in work.items() for item in items if isinstance(item, Continuation)}


def run_method(model, tokenizer, method: Method, work: dict[int, list], references: dict, bar: tqdm,
               name: str) -> dict[int, list[dict]]:
    """Records of one method over every length's items; dense fills ``references`` as it goes."""
    records: dict[int, list[dict]] = {length: [] for length in work}
    with compiled(model, method):
        for length, items in work.items():
            for item in items:
                bar.set_postfix_str(f"{name} {length} {method.label} {getattr(item, 'task', PERPLEXITY)}")
                if isinstance(item, Sample):
                    record = run_sample(model, tokenizer, item)
                else:
                    record, logprobs = run_continuation(model, item, references.get((length, item.index)))
                    if method.kind == "dense":
                        references[length, item.index] = logprobs
                records[length].append({"method": method.label, "kind": method.kind,
                                        "budget": method.budget, **record})
                kvdrive_compile.release_all()       # this sample's KV (its cache object is gone)
                gc.collect()
                bar.update()
    return records


def run_model(name: str, lengths: list[int], config: EvalConfig, bar: tqdm, loaded=None) -> list[dict]:
    """One entry per length: ``{"model", "length", "records"}``, a record per (method, sample)."""
    model, tokenizer = loaded or models.load(name)
    work = make_work(tokenizer, config, lengths)
    methods = methods_for(config.methods, config.budgets, *kvdrive_extra(config, model.config, model.dtype, lengths))
    references = {}
    if PERPLEXITY in config.tasks and methods[0].kind != "dense":      # KL needs dense logits
        references = dense_references(model, work)
    records: dict[int, list[dict]] = {length: [] for length in lengths}
    for method in methods:
        log.info("%s: %s", name, method.label)
        for length, done in run_method(model, tokenizer, method, work, references, bar, name).items():
            records[length] += done
    return [{"model": name, "length": length, "records": records[length]} for length in lengths]


def units(config: EvalConfig) -> int:
    """How many (method, sample) runs the config makes: the progress bar's total."""
    per_length = len(config.tasks) * config.samples
    n_methods = len(methods_for(config.methods, config.budgets))
    return sum(len(lengths) for _, lengths in config.runs) * per_length * n_methods


def run(config: EvalConfig, loaded: Optional[dict] = None) -> dict:
    """Every model of ``config`` over its lengths; ``loaded`` may map a model name to ``(model, tokenizer)``."""
    t0 = time.perf_counter()
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        with tqdm(total=units(config), desc="accuracy", unit="run", dynamic_ncols=True) as bar:
            for name, lengths in config.runs:
                runs += run_model(name, lengths, config, bar, (loaded or {}).get(name))
    finally:
        torch.set_num_threads(threads)
    labels = list(dict.fromkeys(r["method"] for run in runs for r in run["records"]))
    return {"meta": {**config.as_dict(), "methods_run": labels,
                     "torch": torch.__version__, "wall_seconds": time.perf_counter() - t0,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "runs": runs}
