"""Print how many tests ran in each JUnit report that ``.ci/run`` wrote (and fail on none).

Usage: ``python3 scripts/ci_count.py REPORT.xml [REPORT.xml ...]``; standard library only.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(report: Path) -> dict[str, int]:
    """Totals of a pytest JUnit report: tests, failures, errors, skipped, and those that ran."""
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["ran"] = total["tests"] - total["skipped"]
    return total


def main(paths: list[str]) -> int:
    """Print one line per report; exit 1 if a report ran no test or had failures or errors.

    Skips are printed, not failed: a missing asset already fails its test under GQA_REQUIRE_ASSETS=1.
    """
    bad = False
    for path in paths:
        c = counts(Path(path))
        print(
            f"ci: {Path(path).stem}: {c['ran']} tests ran "
            f"({c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped)"
        )
        bad |= c["ran"] == 0 or c["failures"] > 0 or c["errors"] > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
