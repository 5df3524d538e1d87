"""Tokenize and pack raw corpora for pretraining: `python pretrain/prepare.py SOURCES --tokenizer DIR --out DIR`.

The same as `yulan-tune prepare-data`; see `yulan_tune/data/packing.py` for the format and options.
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare-data", *sys.argv[1:]]))
