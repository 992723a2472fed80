"""``python -m lrl.serve --model DIR --host H --port P``."""

import sys

from lrl.serve import main

if __name__ == "__main__":
    sys.exit(main())
