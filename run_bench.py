"""snnbench command line (placeholder until the harness issue lands)."""

import sys

if __name__ == "__main__":
    print("snnbench: the command line arrives with the harness; see README.md", file=sys.stderr)
    sys.exit(2)
