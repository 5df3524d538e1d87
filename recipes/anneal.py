"""Custom annealing from a pre-annealing checkpoint with its optimizer states, launchable on one or many devices:

    accelerate launch recipes/anneal.py --config recipes/configs/anneal_tiny.yaml [--decay cosine ...]

See yulan_tune/anneal.py for what it does.
"""

from yulan_tune.anneal import anneal_main

if __name__ == "__main__":
    raise SystemExit(anneal_main())
