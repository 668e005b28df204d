"""The engine comparison (dpn_fast.engine_comparison, also `dpn-fast bench --engines`) with its
full command line; results files go to benchmarks/results/.

    python benchmarks/bench_engines.py --models DPN92 --batch-sizes 1 8 --threads 1 2 --rounds 3
"""
import sys
from pathlib import Path

from dpn_fast.engine_comparison import main

RESULTS_DIR = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], results_dir=RESULTS_DIR))
