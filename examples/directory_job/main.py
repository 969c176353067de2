"""A directory job: modules beside the entrypoint import as usual."""

import sys

from trainer import fit

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    score = fit(n)
    print(f"fit({n}) = {score}")
    __return__ = score
