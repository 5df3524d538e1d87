"""Supervised fine-tuning, launchable on one or many devices:

    accelerate launch recipes/sft.py --config recipes/configs/tiny_full.yaml [--learning_rate 1e-4 ...]
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["sft", *sys.argv[1:]]))
