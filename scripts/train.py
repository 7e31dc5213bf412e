"""`ssd train` for people used to the ports' layout.

Usage: `torchrun --nproc_per_node=N scripts/train.py CFG [key=value ...]`.
"""

import sys

from ssd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
