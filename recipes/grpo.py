"""RL with verifiable rewards (GRPO through trl), launchable on one or many devices:

    accelerate launch recipes/grpo.py --config recipes/configs/grpo_tiny.yaml [--learning_rate 1e-6 ...]
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["grpo", *sys.argv[1:]]))
