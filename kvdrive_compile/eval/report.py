"""Tables, plots and the raw JSON of an evaluation, and a check of that JSON's structure."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean

from tabulate import tabulate

from .tasks import PERPLEXITY

NUMBER = (int, float)
RECORD = {"method": str, "kind": str, "budget": (int, type(None)), "task": str, "index": int,
          "prompt_tokens": int, "seconds": NUMBER}
TASK_RECORD = {"question": str, "expected": list, "generated": str, "new_tokens": int, "score": NUMBER,
               "info": dict}
PERPLEXITY_RECORD = {"steps": int, "start": int, "ppl": NUMBER, "top1_agreement": NUMBER, "kl": NUMBER}
META = {"runs": list, "tasks": list, "samples": int, "methods": list, "budgets": list, "steps": int,
        "seed": int, "methods_run": list, "wall_seconds": NUMBER}


def _check(obj: dict, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, kind in spec.items():
        if key not in obj:
            raise ValueError(f"{where}: missing {key!r}")
        if isinstance(obj[key], bool) or not isinstance(obj[key], kind):
            raise ValueError(f"{where}.{key}: expected {kind}, got {obj[key]!r}")


def validate(results: dict) -> None:
    """Raise ValueError naming the first place where ``results`` is not what ``runner.run`` writes."""
    _check(results, {"meta": dict, "runs": list}, "results")
    _check(results["meta"], META, "meta")
    for i, run in enumerate(results["runs"]):
        _check(run, {"model": str, "length": int, "records": list}, f"runs[{i}]")
        for j, record in enumerate(run["records"]):
            where = f"runs[{i}].records[{j}]"
            _check(record, RECORD, where)
            _check(record, PERPLEXITY_RECORD if record["task"] == PERPLEXITY else TASK_RECORD, where)
            if record["task"] != PERPLEXITY and not 0 <= record["score"] <= 1:
                raise ValueError(f"{where}.score: {record['score']} is not in [0, 1]")


def summarize(run: dict) -> dict[str, dict[str, float]]:
    """Per method label (in run order): each task's mean score in %, ``avg`` over the retrieval
    tasks, and for perplexity ``ppl`` (geometric mean), ``top1`` (%), ``kl`` and seconds per run."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for record in run["records"]:
        by_method[record["method"]].append(record)
    table = {}
    for label, records in by_method.items():
        row: dict[str, float] = {}
        tasks = list(dict.fromkeys(r["task"] for r in records if r["task"] != PERPLEXITY))
        for task in tasks:
            row[task] = 100 * mean(r["score"] for r in records if r["task"] == task)
        if tasks:
            row["avg"] = mean(row[t] for t in tasks)
        ppl = [r for r in records if r["task"] == PERPLEXITY]
        if ppl:
            row["ppl"] = math.exp(mean(math.log(r["ppl"]) for r in ppl))
            row["top1"] = 100 * mean(r["top1_agreement"] for r in ppl)
            row["kl"] = mean(r["kl"] for r in ppl)
        row["s/run"] = mean(r["seconds"] for r in records)
        table[label] = row
    return table


def table(results: dict, model: str) -> str:
    """A row per (length, method) and a column per task, the average, perplexity metrics and time."""
    rows, columns = [], []
    for run in (r for r in results["runs"] if r["model"] == model):
        summary = summarize(run)
        for row in summary.values():
            columns += [c for c in row if c not in columns]
        rows += [(run["length"], label, row) for label, row in summary.items()]
    order = [c for c in columns if c not in ("avg", "ppl", "top1", "kl", "s/run")]
    order += [c for c in ("avg", "ppl", "top1", "kl", "s/run") if c in columns]
    formats = {"ppl": "{:.2f}", "kl": "{:.4f}", "s/run": "{:.1f}"}
    body = [[length, label] + [formats.get(c, "{:.1f}").format(row[c]) if c in row else "-" for c in order]
            for length, label, row in rows]
    headers = ["length", "method"] + [{"top1": "top-1 %"}.get(c, c) for c in order]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def plot(run: dict, path: Path) -> None:
    """Score vs budget per task: kvdrive and window lines, dense and kvdrive-exact as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(run)
    budgets = sorted({r["budget"] for r in run["records"] if r["budget"] is not None})
    label = {(r["kind"], r["budget"]): r["method"] for r in run["records"]}     # labels carry option notes
    panels = [c for c in next(iter(summary.values())) if c not in ("ppl", "kl", "s/run")]
    cols = min(4, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(3.6 * cols, 2.9 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for kind, style in (("kvdrive", "o-"), ("window", "s--")):
            points = [(b, summary[label[kind, b]][panel]) for b in budgets if label.get((kind, b)) in summary]
            if points:
                ax.plot(*zip(*points), style, label=kind if kind == "window" else "kvdrive (top-k)")
        for kind, style in (("dense", "k-"), ("kvdrive-exact", "g:")):
            if label.get((kind, None)) in summary:
                ax.axhline(summary[label[kind, None]][panel], color=style[0], linestyle=style[1:], label=kind)
        ax.set_title("top-1 agreement with dense (%)" if panel == "top1" else panel, fontsize=9)
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-5, 105)
        ax.set_xlabel("token budget", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{run['model']} at {run['length']} tokens: score (%) vs token budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(parts: list[dict]) -> dict:
    """One result from several runs of the same harness (other seeds, tasks or methods, run in
    parallel or on other machines): the records of equal (model, length) runs are pooled, so
    each table cell averages over every sample; ``meta`` keeps the first run's settings, the
    list of seeds, the summed sample count and wall time, and every method run."""
    if not parts:
        raise ValueError("merge needs at least one result")
    for i, part in enumerate(parts):
        try:
            validate(part)
        except ValueError as e:
            raise ValueError(f"result {i}: {e}") from None
    runs: dict[tuple[str, int], dict] = {}
    for part in parts:
        for run in part["runs"]:
            key = (run["model"], run["length"])
            runs.setdefault(key, {"model": run["model"], "length": run["length"], "records": []})
            runs[key]["records"] += run["records"]
    meta = dict(parts[0]["meta"])
    meta["seeds"] = [p["meta"]["seed"] for p in parts]
    meta["samples"] = sum(p["meta"]["samples"] for p in parts)
    meta["wall_seconds"] = sum(p["meta"]["wall_seconds"] for p in parts)
    meta["methods_run"] = list(dict.fromkeys(m for p in parts for m in p["meta"]["methods_run"]))
    meta["tasks"] = list(dict.fromkeys(t for p in parts for t in p["meta"]["tasks"]))
    return {"meta": meta, "runs": list(runs.values())}


def write(results: dict, out: str | Path) -> dict[str, list[Path]]:
    """results.json, a table per model (``table_<model>.md``) and a plot per (model, length)."""
    validate(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"json": [out / "results.json"], "tables": [], "plots": []}
    written["json"][0].write_text(json.dumps(results, indent=1))
    for model in dict.fromkeys(r["model"] for r in results["runs"]):
        path = out / f"table_{model}.md"
        path.write_text(table(results, model) + "\n")
        written["tables"].append(path)
    for run in results["runs"]:
        path = out / f"{run['model']}_{run['length']}.png"
        plot(run, path)
        written["plots"].append(path)
    return written
