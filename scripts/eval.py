"""`ssd eval` for people used to the ports' layout: `python scripts/eval.py CFG --weights CKPT [key=value ...]`
(`torchrun --nproc_per_node=N scripts/eval.py ...` shards the inference across processes)."""

import sys

from ssd.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
