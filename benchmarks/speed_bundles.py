"""Bundles for benchmarks/speed_table.sh: one per method at the default config
(64 px), seeded random weights, calibrated on 16 texture crops. Scoring speed
depends on the architecture and the sweep, not on what the weights learned.

    python benchmarks/speed_bundles.py WORKDIR [METHOD ...]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main(argv: list[str]) -> None:
    import torch
    from bench_util import random_bundle, texture_lot

    torch.set_num_threads(1)
    workdir = argv[0]
    lot = texture_lot(os.path.join(workdir, "lot"), 16)
    for method in argv[1:] or ["dta", "diffad", "drdc", "recon"]:
        print(random_bundle(method, os.path.join(workdir, method), lot), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
