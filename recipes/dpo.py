"""Preference training (DPO, IPO, hinge, SimPO, ORPO, KTO), launchable on one or many devices:

    accelerate launch recipes/dpo.py --config recipes/configs/dpo_tiny.yaml [--beta 0.05 ...]
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["dpo", *sys.argv[1:]]))
