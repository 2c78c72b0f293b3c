"""The same benchmark in two checkouts, alternating, in one run: the ratio against the commit before a
change, which a shared, noisy machine can still measure (noise only ever adds CPU, so the best of
several rounds per side is compared).

Usage: .venv/bin/python -m bench.ab_commits BASE_CHECKOUT [--rounds 4] [-- BENCH_ARGS]
  e.g. git worktree add /tmp/base HEAD~1 && .venv/bin/python -m bench.ab_commits /tmp/base
Runs `python -m bench.pipeline_cost` in each checkout (the base's own copy of the script); with
`--same-script`, this checkout's bench/pipeline_cost.py in both (for options the base's copy lacks, e.g.
`--store redis`), the checkout under test first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_US = re.compile(r"([0-9.]+) µs CPU per request")


def _run(checkout: Path, bench_args: list[str], same_script: bool = False) -> float:
    script = [str(ROOT / "bench" / "pipeline_cost.py")] if same_script else ["-m", "bench.pipeline_cost"]
    out = subprocess.run(
        [sys.executable, *script, *bench_args],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout.resolve())},
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout
    m = _US.search(out)
    if m is None:
        raise RuntimeError(f"no figure in the output of {checkout}: {out!r}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--same-script", action="store_true", help="run this checkout's script in both checkouts")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: the benchmark's own options
    args = ap.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1 :] or ["--requests", "5000", "--repeats", "3"]
    base: list[float] = []
    head: list[float] = []
    for i in range(args.rounds):
        order = [(args.base, base), (ROOT, head)] if i % 2 == 0 else [(ROOT, head), (args.base, base)]
        for checkout, results in order:
            results.append(_run(checkout, args.bench_args, args.same_script))
    print(f"{'':<6} {'best µs':>9} {'all rounds':<40}")
    print(f"{'base':<6} {min(base):>9.1f} {', '.join(f'{x:.1f}' for x in base)}")
    print(f"{'head':<6} {min(head):>9.1f} {', '.join(f'{x:.1f}' for x in head)}")
    print(f"head / base (best rounds): {min(head) / min(base):.3f}")


if __name__ == "__main__":
    main()
