"""Argument types shared by the benchmark scripts (each run as a file, so this directory is
on the import path)."""


def ints(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``: a comma-separated list of integers (argparse ``type``)."""
    return [int(x) for x in text.split(",")]
