"""Custom annealing from a pre-annealing checkpoint with its optimizer states, launchable on one or many devices:

    accelerate launch recipes/anneal.py --config recipes/configs/anneal_tiny.yaml [--decay cosine ...]

See yulan_tune/anneal.py for what it does.
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["anneal", *sys.argv[1:]]))
