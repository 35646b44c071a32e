"""Print a markdown table of a ``--benchmark-json`` file: medians and interleaved ratios.

Usage: ``python benchmarks/report.py results.json``. Benchmarks that stored an interleaved
``ratio_median`` (see ``interleave.py``) show it beside the median time of both steps.
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    with open(path) as handle:
        data = json.load(handle)
    print("| group | case | JD median (ms) | plain median (ms) | ratio JD / plain |")
    print("|---|---|---|---|---|")
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        case = bench["name"].split("[", 1)[-1].rstrip("]") if "[" in bench["name"] else ""
        ratio = f"{info['ratio_median']:.2f}×" if "ratio_median" in info else "n/a"
        plain = f"{info['baseline_ms']:.2f}" if "baseline_ms" in info else "n/a"
        median = bench["stats"]["median"] * 1e3
        print(f"| {bench['group']} | {case} | {median:.2f} | {plain} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
