"""``make bench``: run every benchmark, then print one line per target from their JSON results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"__init__", "harness", "run_all", "codec_cost", "codecs_ddp"}  # helpers of bench.codecs


def main(names: list[str]) -> int:
    scripts = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP)
    chosen = names or scripts
    failed = []
    for name in chosen:
        print(f"\n##### bench/{name}.py", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=HERE.parent)
        if rc != 0:
            failed.append(name)
    print("\n##### targets")
    for name in chosen:
        path = HERE / "results" / f"{name}.json"
        if not path.exists():
            print(f"{name}: no results ({'failed' if name in failed else 'missing'})")
            continue
        for t in json.loads(path.read_text()).get("targets", []):
            state = "MET" if t["met"] else "NOT MET"
            print(f"{name}: {t['name']} = {t['value']} (goal {t['goal']}) {state}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
