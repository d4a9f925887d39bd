"""Compare two JUnit XML reports of PEFT's tests, case for case: the run without lorafast and the patched run.

    python tools/peft_suite/compare.py unpatched.xml patched.xml

Prints passed/failed/skipped counts of each and every case that passes unpatched but not patched (exit 1 if any).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter


def outcomes(path: str) -> dict[str, str]:
    """``{case id: "passed" | "failed" | "skipped"}`` of a JUnit XML report (errors count as failed)."""
    result = {}
    for case in ET.parse(path).iter("testcase"):
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        result[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return result


def main(unpatched_path: str, patched_path: str) -> int:
    unpatched, patched = outcomes(unpatched_path), outcomes(patched_path)
    for label, run in (("unpatched", unpatched), ("patched", patched)):
        counts = Counter(run.values())
        print(f"{label}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    broken = sorted(
        case for case, outcome in unpatched.items() if outcome == "passed" and patched.get(case) != "passed"
    )
    fixed = sorted(case for case, outcome in patched.items() if outcome == "passed" and unpatched.get(case) != "passed")
    print(f"passing unpatched but not patched: {len(broken)}; passing only patched: {len(fixed)}")
    for case in broken:
        print(f"  NEWLY FAILING {case} ({patched.get(case, 'missing')})")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
