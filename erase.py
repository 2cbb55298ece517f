"""Entry point for `python erase.py ...` and `accelerate launch erase.py ...` (same CLI as `erasure`)."""
from erasure.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
