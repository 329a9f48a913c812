"""False-alarm rate and detection rate of the drift alarm (lotscan.platform.drift).

Normal image scores are drawn from a right-skewed distribution (gamma, shape 4);
a lighting change multiplies every score by ``factor``. For each (lot size,
calibration size) pair: the share of unshifted lots that alarm (false alarms)
and of shifted lots that alarm (detections), over ``--trials`` seeded draws.

example:
  python benchmarks/drift_power.py --trials 400
"""

from __future__ import annotations

import argparse

import numpy as np

from lotscan.platform.drift import score_drift

SIZES = [(12, 14), (24, 40), (200, 40), (2000, 200), (20000, 2000)]
FACTORS = (1.1, 1.2, 1.5, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=400)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def scores(n: int) -> np.ndarray:
        return rng.gamma(4.0, 0.25, n)

    print("| lot images | calibration scores | false alarms | " +
          " | ".join(f"detected x{f}" for f in FACTORS) + " |")
    print("| ---: | ---: | ---: | " + " | ".join("---:" for _ in FACTORS) + " |")
    for n, m in SIZES:
        false = np.mean([score_drift(scores(n), np.sort(scores(m)))["alarm"]
                         for _ in range(args.trials)])
        hits = [np.mean([score_drift(scores(n) * f, np.sort(scores(m)))["alarm"]
                         for _ in range(max(args.trials // 4, 1))]) for f in FACTORS]
        print(f"| {n} | {m} | {100 * false:.1f} % | " +
              " | ".join(f"{100 * h:.0f} %" for h in hits) + " |")


if __name__ == "__main__":
    main()
