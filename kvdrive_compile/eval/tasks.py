"""Long-context task generators (RULER-style families, our own wording) and their scoring.

Every sample is plain completion text that ends in an answer prefix, built from a seed and fit
to a token count: the prompt plus its answer tokens stay within the target length.
"""
from __future__ import annotations

import functools
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..prompts import FILLER, passkey_prompt
from . import texts

HEAD = ("A long text follows. Some facts are hidden in it; read it carefully and remember them, "
        "because a question about them comes after the text.\n\n")
NEEDLE = "Remember this: the secret {kind} for {key} is {value}."


@dataclass(frozen=True)
class Sample:
    """One prompt of a task: the greedy continuation should contain every string of ``answers``."""

    task: str
    index: int
    prompt: str
    answers: tuple[str, ...]
    max_new_tokens: int
    info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Continuation:
    """A slice of long text for perplexity: ``prefix`` is prefilled, ``continuation`` teacher-forced.

    prefix: [length - len(continuation)] token ids; continuation: [steps + 1] token ids.
    """

    index: int
    prefix: list[int]
    continuation: list[int]
    start: int


def score(answers: tuple[str, ...] | list[str], generated: str) -> float:
    """The share of ``answers`` found, case-insensitively, in ``generated`` (0..1)."""
    text = generated.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


def fit(build: Callable[[int], str], tokenizer, target: int, upper: int) -> str:
    """``build(n)`` for the largest ``n`` in [0, upper] whose text has at most ``target`` tokens.

    ``build`` must grow with n; a binary search tokenizes about log2(upper) candidate prompts.
    """
    lo, hi = 0, upper
    if n_tokens(tokenizer, build(hi)) <= target:
        raise ValueError(f"not enough text for {target} tokens (all {upper} units fit); use a shorter length")
    while hi - lo > 1:                       # invariant: build(lo) fits, build(hi) does not
        mid = (lo + hi) // 2
        if n_tokens(tokenizer, build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return build(lo)


def insert(units: list[str], needles: list[tuple[float, str]]) -> str:
    """The units joined, with each ``(depth, needle)`` placed at ``depth`` (0..1) of the units."""
    out = list(units)
    for depth, needle in sorted(needles, key=lambda dn: -dn[0]):     # from the back: indices hold
        out.insert(round(depth * len(units)), f" {needle} ")
    return "".join(out)


# -- haystacks: unit lists that ``fit`` takes a prefix of --

@functools.cache
def essay_sentences() -> tuple[str, ...]:
    return tuple(re.findall(r"[^.!?]*[.!?]+\s*", texts.essays()))


def haystack_units(kind: str, rng: random.Random, upper: int) -> list[str]:
    """``upper`` consecutive units: a repeated filler sentence group, or essay sentences from a seeded start."""
    if kind == "repeat":
        return [FILLER] * upper
    sentences = essay_sentences()
    start = rng.randrange(len(sentences) - upper)
    return list(sentences[start:start + upper])


def upper_units(kind: str, target: int) -> int:
    per_unit = 24 if kind == "repeat" else 20          # tokens per unit, a low estimate
    return target // per_unit * 2 + 16


def key_word(rng: random.Random, taken: set[str]) -> str:
    """A fresh ``adjective-noun`` key, e.g. ``quiet-harbor``."""
    while True:
        key = f"{rng.choice(texts.words('adjective'))}-{rng.choice(texts.words('noun'))}"
        if key not in taken:
            taken.add(key)
            return key


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def needle_prompt(rng, tokenizer, target: int, haystack: str, needles: list[tuple[float, str]],
                  question: str) -> str:
    upper = upper_units(haystack, target)
    units = haystack_units(haystack, rng, upper)
    return fit(lambda n: HEAD + insert(units[:n], needles) + "\n\n" + question, tokenizer, target, upper)


# -- task families: each returns (prompt, answers, info) for a prompt of at most ``target`` tokens --

def single_needle(haystack: str, kind: str = "number"):
    def build(rng: random.Random, tokenizer, target: int, depth: float):
        key = key_word(rng, set())
        value = number(rng) if kind == "number" else str(uuid.UUID(int=rng.getrandbits(128), version=4))
        needle = NEEDLE.format(kind=kind if kind == "number" else "code", key=key, value=value)
        noun = "number" if kind == "number" else "code"
        question = f"What is the secret {noun} for {key}? The secret {noun} for {key} is"
        prompt = needle_prompt(rng, tokenizer, target, haystack, [(depth, needle)], question)
        return prompt, (value,), {"depth": depth, "key": key}
    return build


def multi_key(rng: random.Random, tokenizer, target: int, depth: float):
    taken: set[str] = set()
    keys = [key_word(rng, taken) for _ in range(4)]
    values = [number(rng) for _ in keys]
    needles = [(depth, NEEDLE.format(kind="number", key=keys[0], value=values[0]))]
    needles += [(rng.random(), NEEDLE.format(kind="number", key=k, value=v)) for k, v in zip(keys[1:], values[1:])]
    question = f"What is the secret number for {keys[0]}? The secret number for {keys[0]} is"
    prompt = needle_prompt(rng, tokenizer, target, "essay", needles, question)
    return prompt, (values[0],), {"depth": depth, "key": keys[0], "distractors": keys[1:]}


def multi_value(rng: random.Random, tokenizer, target: int, depth: float):
    key = key_word(rng, set())
    values = [number(rng) for _ in range(4)]
    needles = [(rng.random(), f"Remember this: one of the secret numbers for {key} is {v}.") for v in values]
    question = (f"What are all the secret numbers for {key}? "
                f"The secret numbers for {key} are")
    prompt = needle_prompt(rng, tokenizer, target, "essay", needles, question)
    return prompt, tuple(values), {"key": key}


def multi_query(rng: random.Random, tokenizer, target: int, depth: float):
    taken: set[str] = set()
    keys = [key_word(rng, taken) for _ in range(4)]
    values = [number(rng) for _ in keys]
    needles = [(rng.random(), NEEDLE.format(kind="number", key=k, value=v)) for k, v in zip(keys, values)]
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    question = f"What are the secret numbers for {listed}? The secret numbers for {listed} are"
    prompt = needle_prompt(rng, tokenizer, target, "essay", needles, question)
    return prompt, tuple(values), {"keys": keys}


def variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def variable_tracking(rng: random.Random, tokenizer, target: int, depth: float, hops: int = 4):
    taken: set[str] = set()
    names = [variable_name(rng, taken) for _ in range(hops + 1)]
    value = number(rng, 5)
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in lines)
    question = (f"Question: which variables in the text above hold the value {value}, assigned directly "
                f"or through other variables? Answer: the variables that hold {value} are")
    prompt = needle_prompt(rng, tokenizer, target, "repeat", list(zip(depths, lines)), question)
    return prompt, tuple(names), {"chain": lines}


def common_words(rng: random.Random, tokenizer, target: int, depth: float,
                 common: int = 10, common_repeats: int = 20, rare_repeats: int = 2):
    nouns = list(texts.words("noun"))
    rng.shuffle(nouns)
    top, rare = nouns[:common], nouns[common:]
    order_seed = rng.getrandbits(64)
    head = "Below is a long list of words. Some words appear in it much more often than others.\n\n"
    question = (f"\n\nQuestion: which {common} words appear most often in the list above? "
                f"Answer: the {common} most frequent words in the list are:")

    def build(n: int) -> str:
        items = top * common_repeats + rare[:n] * rare_repeats
        random.Random(order_seed).shuffle(items)
        return head + ", ".join(items) + "." + question

    prompt = fit(build, tokenizer, target, min(len(rare), target // 2))
    return prompt, tuple(top), {"common_repeats": common_repeats, "rare_repeats": rare_repeats}


def passkey(rng: random.Random, tokenizer, target: int, depth: float):
    # passkey_prompt grows the filler until it reaches its target: aim a little short of ours
    prompt, key = passkey_prompt(tokenizer, target - 32, depth=depth, seed=rng.randrange(2**31))
    return prompt, (key,), {"depth": depth}


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable
    max_new_tokens: int        # enough for the answer, and no more: decode steps are the cost
    about: str


TASKS = {t.name: t for t in [
    Task("niah_repeat", single_needle("repeat"), 12, "a 7-digit number in a repeated-filler haystack"),
    Task("niah_essay", single_needle("essay"), 12, "a 7-digit number in an essay haystack"),
    Task("niah_uuid", single_needle("essay", "uuid"), 32, "a UUID in an essay haystack"),
    Task("multikey", multi_key, 12, "the number of one key among 3 distractor keys"),
    Task("multivalue", multi_value, 48, "all 4 numbers given for one key"),
    Task("multiquery", multi_query, 48, "the numbers of 4 keys asked at once"),
    Task("vartrack", variable_tracking, 40, "the 5 variables of a chain of 4 assignments"),
    Task("common_words", common_words, 40, "the 10 most frequent words of a long list"),
    Task("passkey", passkey, 8, "a 5-digit pass key in filler, at depths 0..100%"),
]}
PERPLEXITY = "perplexity"


def depth_of(index: int, samples: int) -> float:
    """Needle depths spread evenly over a task's samples: 0, ..., 1 (0.5 for a single sample)."""
    return 0.5 if samples == 1 else index / (samples - 1)


def make_sample(task: str, tokenizer, length: int, index: int, samples: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``samples`` of a task; its prompt has at most ``length - max_new_tokens`` tokens."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {sorted(TASKS) + [PERPLEXITY]}")
    spec = TASKS[task]
    rng = random.Random(f"{seed}:{task}:{length}:{index}")
    prompt, answers, info = spec.build(rng, tokenizer, length - spec.max_new_tokens, depth_of(index, samples))
    return Sample(task, index, prompt, answers, spec.max_new_tokens, info)


_corpus_ids: dict[str, list[int]] = {}


def corpus_ids(tokenizer) -> list[int]:
    """The long text's token ids (no special tokens), tokenized once per tokenizer."""
    name = tokenizer.name_or_path or repr(type(tokenizer))
    if name not in _corpus_ids:
        _corpus_ids[name] = tokenizer(texts.long_text(), add_special_tokens=False).input_ids
    return _corpus_ids[name]


def make_continuation(tokenizer, length: int, index: int, steps: int, seed: int = 0) -> Continuation:
    """A seeded slice of the long text: ``length`` tokens in all, the last ``steps + 1`` teacher-forced."""
    ids = corpus_ids(tokenizer)
    special = tokenizer("").input_ids                  # e.g. Gemma's <bos>; nothing for SmolLM2
    body = length - len(special)
    if body + 1 > len(ids):
        raise ValueError(f"the long text has {len(ids)} tokens, fewer than {length}: use a shorter length")
    start = random.Random(f"{seed}:{PERPLEXITY}:{length}:{index}").randrange(len(ids) - body)
    window = ids[start:start + body]
    split = body - (steps + 1)
    return Continuation(index, special + window[:split], window[split:], start)
