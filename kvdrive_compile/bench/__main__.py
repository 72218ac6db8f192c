"""``python -m kvdrive_compile.bench [options]`` (the same as ``kvdrive bench [options]``)."""
import sys

from .cli import main

sys.exit(main())
