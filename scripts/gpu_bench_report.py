"""Gather what scripts/gpu-bench.sh left in its work folder into one JSON (standard library only,
so it runs whatever else failed): the bench JSON per batch, the parity tests' JUnit results,
each step's exit code and seconds, the GPU, and the tail of any failed step's log.

    python3 scripts/gpu_bench_report.py WORK_DIR OUT_JSON
"""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def parity(junit: Path) -> dict:
    if not junit.is_file():
        return {"ran": False}
    cases = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    outcomes = [case["outcome"] for case in cases]
    return {"ran": True, "passed": outcomes.count("passed"), "failed": outcomes.count("failure") + outcomes.count("error"),
            "skipped": outcomes.count("skipped"), "tests": cases}


def report(work: Path) -> dict:
    steps = {}
    for status in sorted(work.glob("*.status")):
        step = json.loads(status.read_text())
        log = work / f"{status.stem}.log"
        if step["rc"] != 0 and log.is_file():
            step["log_tail"] = log.read_text(errors="replace")[-3000:]
        steps[status.stem] = step
    bench = {path.stem.removeprefix("bench-b"): json.loads(path.read_text()) for path in sorted(work.glob("bench-b*.json"))}
    gpu = work / "nvidia-smi.txt"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    return {"gpu": gpu.read_text().strip() if gpu.is_file() else None, "commit": commit or None, "steps": steps,
            "bench_by_batch": bench, "parity": parity(work / "parity.xml")}


def main(argv: list[str]) -> int:
    work, out = Path(argv[1]), Path(argv[2])
    out.write_text(json.dumps(report(work), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
