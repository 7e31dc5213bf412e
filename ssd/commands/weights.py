"""``ssd weights list``: the weights ``--weights``, ``model.init`` and ``ssd convert`` take by name."""

from __future__ import annotations

import argparse

from ssd.download import weights_cache
from ssd.weights import weights_table


def run(args: argparse.Namespace) -> int:
    for row in weights_table():
        cached = f"cached: {row['cached']}" if row["cached"] else "not cached: downloaded and converted on first use"
        print(f"{row['name']}  (ssd convert --from {row['converter']})")
        for line in (row["url"], row["expects"], cached, f"terms: {row['terms']}"):
            print(f"    {line}")
    print(f"cache: {weights_cache()} (SSD_CACHE_DIR)")
    return 0
