"""`python -m train ...` is the same as `grip ...`."""

from train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
