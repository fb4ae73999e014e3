"""``python -m deepabdominalreg`` — the command-line tool."""

from deepabdominalreg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
