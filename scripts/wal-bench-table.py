#!/usr/bin/env python3
"""Prints the durable-append benchmark as a table: WAL against the raw file, medians and ratios.

Run `cargo bench -p spool-bench --bench wal_append` first; this reads criterion's saved
estimates from target/criterion/durable_append/.
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion" / "durable_append"


def per_second(kind: str, size: str, outstanding: str) -> float:
    path = root / f"{kind}_{size}" / outstanding / "new" / "estimates.json"
    median_ns = json.loads(path.read_text())["median"]["point_estimate"]
    return 1e9 / median_ns


if not root.exists():
    sys.exit(f"no results under {root}: run cargo bench -p spool-bench --bench wal_append")
print("| record | outstanding | WAL appends/s | raw appended/s | raw preallocated/s | WAL / raw appended | WAL / raw preallocated |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for size in ["64B", "256B", "4096B"]:
    for outstanding in ["1", "16", "1024"]:
        try:
            wal = per_second("wal", size, outstanding)
            raw = per_second("raw", size, outstanding)
            rawpre = per_second("rawpre", size, outstanding)
        except FileNotFoundError:
            continue
        print(
            f"| {size} | {outstanding} | {wal:,.0f} | {raw:,.0f} | {rawpre:,.0f} "
            f"| {wal / raw:.2f} | {wal / rawpre:.2f} |"
        )
