"""The Gluon runners' variants and output: a row printed as it is measured, the rows as JSON at the end."""

import importlib
import json

import torch


def variant_modules(spec: str) -> dict:
    """The modules named in ``spec`` (comma-separated, in packkv.kernels), by name."""
    return {name: importlib.import_module(f"packkv.kernels.{name}") for name in filter(None, spec.split(","))}


def report(rows: list[dict], row: dict) -> None:
    """Keep ``row`` and print it on one line."""
    rows.append(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def save(path: str | None, rows: list[dict]) -> None:
    """Write the rows and the device's name to ``path`` (nothing if None)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
