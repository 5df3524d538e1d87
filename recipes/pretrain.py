"""Pretrain a yulanmini model the YuLan way (muP, WSD, curriculum phases, exact resume), on one or many devices:

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml
    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml recipes/pretrain.py \
        --config recipes/configs/pretrain_yulan_mini.yaml --data_root /data/yulan_packed

Relaunching the same command resumes from the newest complete checkpoint in output_dir.
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
