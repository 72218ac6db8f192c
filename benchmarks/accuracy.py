"""Long-context accuracy of kvdrive's sparse selection against dense attention: ``kvdrive eval``
(kvdrive_compile/eval) with the same options.

    python benchmarks/accuracy.py --preset smollm2-8k --samples 3 --threads 1
"""
import sys

from kvdrive_compile.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
