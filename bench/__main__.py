"""``python -m bench SUITE [options]``: run a throughput suite, print a table, write JSON (+ a plot).

SIGTERM or SIGINT while a suite runs: the rows it has finished (those it appended to ``args.result_rows``) are written
with ``"complete": false`` and the runner exits with 124 (the device check's time limit relies on this).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time

from bench.common import SUITES, print_table, write_results


class Stopped(Exception):
    """Raised inside the suite by the SIGTERM/SIGINT handler."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, allow_abbrev=False)
    parser.add_argument("suite", nargs="?", choices=sorted(SUITES), help="suite to run")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--quick", action="store_true", help="smallest shapes only (smoke run)")
    parser.add_argument("--out", default=None, help="directory for the JSON/plot (default bench/results)")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args, rest = parser.parse_known_args(argv)
    if args.list or not args.suite:
        for name, mod in sorted(SUITES.items()):
            print(f"{name:<22}{mod}")
        return 0
    module = importlib.import_module(SUITES[args.suite])
    sub = argparse.ArgumentParser(prog=f"python -m bench {args.suite}")
    if hasattr(module, "add_args"):
        module.add_args(sub)
    sub_args = sub.parse_args(rest)
    for k, v in vars(args).items():
        setattr(sub_args, k, v)
    sub_args.result_rows = []  # suites that append here as they go keep their finished rows when stopped
    recorded = {k: v for k, v in vars(sub_args).items() if k != "result_rows"}
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    t0, stopped = time.perf_counter(), None
    try:
        rows = module.run(sub_args)
    except Stopped as exc:
        stopped, rows = str(exc), sub_args.result_rows
        print(f"[bench] {args.suite} stopped by {stopped}: writing the {len(rows)} rows it finished")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print_table(rows)
    extra = {}
    if hasattr(module, "summary") and rows:
        try:
            extra = module.summary(rows) or {}
        except Exception as exc:  # noqa: BLE001 - a partial run may lack rows a summary needs
            if not stopped:
                raise
            extra = {"summary_error": f"{type(exc).__name__}: {exc}"}
    extra = {**extra, "wall_s": time.perf_counter() - t0}
    if stopped:
        extra["stopped_by"] = stopped
    path = write_results(
        args.suite, rows, extra=extra, out_dir=args.out, complete=stopped is None, args=recorded
    )
    if hasattr(module, "plot") and not args.no_plot and rows and not stopped:
        module.plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 124 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
