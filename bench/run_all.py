"""``make bench``: run every benchmark, then print one line per target from their JSON results.

Each target is MET, NOT MET or NOT RUN (with the reason: e.g. a benchmark that needs root).
``QUICK`` lists benchmarks that ``make bench`` runs in a shorter mode; their quick results go to
their own file, so the full results that the docs are rendered from are not overwritten.

    python -m bench.run_all [NAME ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.harness import format_target

HERE = Path(__file__).resolve().parent
#: helpers, not benchmarks (bench.codecs uses codec_cost and codecs_ddp; bench.cluster the rest;
#: every benchmark harness and runs)
SKIP = {"__init__", "harness", "runs", "run_all", "render", "netns", "codec_cost", "codecs_ddp",
        "ddp_cluster_job", "cluster_run", "cluster_targets", "kill_resume_netns", "killer",
        "pinning", "cpu_window"}
#: name -> (arguments for make bench, the results file those arguments write)
QUICK = {"cluster": (["--quick"], "cluster_quick")}


def main(names: list[str]) -> int:
    scripts = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP)
    chosen = names or scripts
    failed = []
    for name in chosen:
        print(f"\n##### bench/{name}.py", flush=True)
        extra = QUICK.get(name, ([], name))[0]
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra], cwd=HERE.parent)
        if rc != 0:
            failed.append(name)
    print("\n##### targets")
    for name in chosen:
        path = HERE / "results" / f"{QUICK.get(name, ([], name))[1]}.json"
        if name in failed:  # its file, if any, is an earlier run's (a clone has the committed one)
            print(f"{name}: FAILED in this run (its error is above); no targets of this run")
            continue
        if not path.exists():
            print(f"{name}: no results (missing)")
            continue
        for t in json.loads(path.read_text()).get("targets", []):
            print(format_target(t, prefix=f"{name}: "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
