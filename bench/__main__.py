"""``python -m bench SUITE [options]``: run a throughput suite, print a table, write JSON (+ a plot)."""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.common import SUITES, print_table, write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", nargs="?", choices=sorted(SUITES), help="suite to run")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--quick", action="store_true", help="smallest shapes only (smoke run)")
    parser.add_argument("--out", default=None, help="directory for the JSON/plot (default bench/results)")
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
    rows = module.run(sub_args)
    print_table(rows)
    extra = module.summary(rows) if hasattr(module, "summary") else None
    path = write_results(args.suite, rows, extra=extra, out_dir=args.out)
    if hasattr(module, "plot"):
        module.plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
