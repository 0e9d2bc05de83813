"""Paper Fig. 2: block output amplitudes, res-post-norm vs pre-norm.

`python scripts/signal_propagation.py --help`; the code is in simmim.tools.signal_propagation.
"""
from simmim.cli import run

if __name__ == "__main__":
    run("simmim.tools.signal_propagation")
