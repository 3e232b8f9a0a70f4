"""`python -m nn_decomp.collect DIR [out=PATH]`: the sweep table of a sweep (or run) dir, one row per
job (runtime/sweep_table.py: which columns), as CSV (default DIR/runs.csv) and, when pyarrow imports,
a Parquet file next to it; prints one line per job."""
import sys
from pathlib import Path

from nn_decomp.runtime.sweep_table import collect, summary, write_table

USAGE = "usage: python -m nn_decomp.collect DIR [out=PATH.csv]  (DIR: a sweep or runs dir)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if {"--help", "-h"} & set(args):
        print(USAGE)
        return 0
    dirs = [a for a in args if "=" not in a]
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = set(opts) - {"out"}
    if len(dirs) != 1 or unknown:
        print(f"error: {USAGE}" + (f"  (unknown option {sorted(unknown)})" if unknown else ""), file=sys.stderr)
        return 2
    if not Path(dirs[0]).is_dir():
        print(f"error: {dirs[0]} is not a directory — pass a sweep dir, e.g. outputs/sweeps/<date>/<time>",
              file=sys.stderr)
        return 2
    rows = collect(dirs[0])
    if not rows:
        print(f"error: no jobs under {dirs[0]} — pass the dir a sweep wrote (its jobs hold .hydra/)", file=sys.stderr)
        return 1
    paths = write_table(rows, opts.get("out", Path(dirs[0]) / "runs.csv"))
    print(summary(rows))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
