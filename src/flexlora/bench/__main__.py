"""`python -m flexlora.bench aggregate --quick`: the same as `flexlora bench aggregate --quick`."""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flexlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
