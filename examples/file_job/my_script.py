"""A script job: arguments arrive in sys.argv, __return__ is the result."""

import sys


def main(*args: str) -> str:
    print("Hello world", *args)
    return "Hello world " + " ".join(args)


if __name__ == "__main__":
    __return__ = main(*sys.argv[1:])
