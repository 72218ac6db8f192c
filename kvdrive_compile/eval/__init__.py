"""The offline long-context accuracy harness: RULER-style tasks, pass keys and perplexity over
text from installed packages, run densely and through kvdrive at several token budgets.

    kvdrive eval --preset smoke            # or: python -m kvdrive_compile.eval --preset smoke
    kvdrive eval --preset smollm2-8k --samples 2 --tasks passkey niah_essay perplexity

texts (where the text comes from), tasks (generators and scoring), config (what runs),
runner (methods over the samples), report (tables, plots, JSON).
"""
