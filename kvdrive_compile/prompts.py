"""Long prompts built in code (no data files): a pass key hidden in filler."""
from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HEAD = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there. ")
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, target_tokens: int, depth: float = 0.5, seed: int = 7) -> tuple[str, str]:
    """``(prompt, key)``: about ``target_tokens`` tokens with the key at ``depth`` (0..1) of the filler."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(n: int) -> str:
        before = round(n * depth)
        return HEAD + FILLER * before + needle + FILLER * (n - before) + QUESTION

    per_filler = len(tokenizer(FILLER * 10).input_ids) / 10
    n = max(1, int((target_tokens - 60) / per_filler))
    while len(tokenizer(build(n)).input_ids) < target_tokens:
        n += 1
    return build(n), key
