"""FlexLoRA's server step against the reference procedure; same as `flexlora bench aggregate`.

    python benchmarks/aggregate.py --quick
    python benchmarks/aggregate.py --sizes 1.3b,8b --cases a,b --json bench.json
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flexlora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "aggregate", *sys.argv[1:]]))
