"""The single entry point of fpcd experiments (the installed ``fpcd`` command is the same program).

    python experiments/main.py --config=experiments/calo.py
    python experiments/main.py --config=experiments/gmm.py:tiny --config.train.num_steps=500 --mode=train
    ./launch.sh --local --processes 2 -- --config=experiments/gmm.py:tiny      # a 2-process job here

Flags, modes and error handling: :mod:`fpcd.cli`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fpcd from this checkout

from fpcd.cli import run  # noqa: E402

if __name__ == "__main__":
    run()
