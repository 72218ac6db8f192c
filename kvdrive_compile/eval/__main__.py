"""``python -m kvdrive_compile.eval [options]`` is ``kvdrive eval [options]``."""
import sys

from ..cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
