"""Argument types shared by the benchmark scripts (each run as a file, so this directory is
on the import path)."""


def ints(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``: a comma-separated list of integers (argparse ``type``)."""
    return [int(x) for x in text.split(",")]


def optional_ints(text: str) -> list[int | None]:
    """``"none,128"`` -> ``[None, 128]``: like :func:`ints`, ``none`` standing for a default."""
    return [None if x == "none" else int(x) for x in text.split(",")]
