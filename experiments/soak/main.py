"""The soak test of the online path under faults, by the experiments' usual
entry point; the flags and the work are in run.py.

    python -m experiments.soak.main --job MODULE:NAME --minutes 10    # same as python -m experiments.soak.run
"""

import sys

from experiments.soak.run import main

if __name__ == "__main__":
    sys.exit(main())
