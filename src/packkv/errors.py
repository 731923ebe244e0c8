"""The exceptions packkv raises for bad packed data and saved files.

Every one is a :class:`PackKVError`, itself a ``ValueError``: code that already catches
``ValueError`` for bad input (the CLI does) catches these too, and code that wants only
packkv's verdicts on data catches ``PackKVError``.
"""

from __future__ import annotations


class PackKVError(ValueError):
    """Base class of the errors packkv raises about packed data and saved files."""


class CorruptDataError(PackKVError):
    """Packed data or a saved file is inconsistent: a bad dtype, shape, offset, scale,
    checksum or header field. The message names the field and the first bad index."""


class FormatVersionError(PackKVError):
    """A saved file was written in a format version newer than this packkv reads."""


class ModelMismatchError(PackKVError):
    """A saved cache was made for another model than the one it is loaded for."""
