"""`python -m dlcli` is the same as the `dlcli` console script."""

from dlcli.cli import main

if __name__ == "__main__":
    main()
