"""`python -m elastic_cuda <command>`: see elastic_cuda.cli."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
