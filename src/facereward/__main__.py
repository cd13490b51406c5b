"""`python -m facereward ...`: the same as the `facereward` command (what `accelerate launch --module facereward` runs)."""

from facereward.cli import main

if __name__ == "__main__":
    main()
