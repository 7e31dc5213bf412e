"""`ssd bench` for people used to the ports' layout: `python scripts/bench.py [--only ROW ...] [--json OUT]`."""

import sys

from ssd.bench import main

if __name__ == "__main__":
    sys.exit(main())
