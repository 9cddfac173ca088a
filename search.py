"""Search a model schedule under a time budget: python search.py budget=B (not implemented yet)."""
import sys

if __name__ == "__main__":
    sys.exit("search.py: not yet implemented — the schedule search lands with the OMS-DPM search issue. "
             "Train zoo members with `python train.py model=<tiny|small|medium|large>` meanwhile.")
