"""dlcli: the "Introduction to Deep Learning" assignments as one command-line toolkit."""

__version__ = "0.1.0"
