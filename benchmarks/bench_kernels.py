"""The kernel benchmark and GPU correctness sweep (`bitsmith bench kernels`): this script only forwards to
`bitsmith.kernels.bench_kernels`, where the harness lives so that the installed CLI has it too.

    PYTHONPATH=src python benchmarks/bench_kernels.py --check --out out/bench      # same as: bitsmith bench kernels ...
"""

import sys

from bitsmith.kernels.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main())
