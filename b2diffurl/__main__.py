"""``python -m b2diffurl`` = the ``b2diffurl`` command; torchrun launches it as ``torchrun ... -m b2diffurl``."""

import sys

from b2diffurl.cli import main

if __name__ == "__main__":
    sys.exit(main())
