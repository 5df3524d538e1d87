"""Supervised fine-tuning, launchable on one or many devices:

    accelerate launch recipes/sft.py --config recipes/configs/tiny_full.yaml [--learning_rate 1e-4 ...]
"""

from yulan_tune.sft import sft_main

if __name__ == "__main__":
    raise SystemExit(sft_main())
