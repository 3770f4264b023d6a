"""Run the benchmarks against one stack: ``python -m bench [--quick] [--only NAME ...]``.

Each benchmark prints a table and writes bench/results/<name>.json; nothing here fails on
times. ``--quick`` uses tiny sizes so CI can check that every benchmark runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from typing import Any

from bench.common import bench_stack, machine, write_result

# In this order: growth truncates the jobs table, waiting leaves 10,000 jobs in flight.
ORDER = ["submit", "pipeline", "callback", "output_copy", "fanout", "growth", "waiting"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: only check they run")
    parser.add_argument("--only", action="append", choices=ORDER, help="run only these")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway in submit")
    args = parser.parse_args(argv)
    names = [n for n in ORDER if not args.only or n in args.only]
    started = time.monotonic()
    summary: dict[str, Any] = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    failed = []
    with bench_stack(args.quick) as bench:
        summary["stack_start_s"] = round(time.monotonic() - started, 1)
        for name in names:
            t0 = time.monotonic()
            module = importlib.import_module(f"bench.{name}")
            try:
                kwargs = {"profile": True} if args.profile and name == "submit" else {}
                result = module.run(bench, **kwargs)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                result = {"error": traceback.format_exc()}
            result["benchmark_seconds"] = round(time.monotonic() - t0, 1)
            result["quick"] = args.quick
            write_result(name, result)
            summary["benchmarks"][name] = result["benchmark_seconds"]
            print(f"  ({name}: {result['benchmark_seconds']} s)")
    summary["total_seconds"] = round(time.monotonic() - started, 1)
    summary["failed"] = failed
    write_result("summary", summary)
    print(f"\nbench: {len(names) - len(failed)}/{len(names)} ran in {summary['total_seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
