"""Curation: raw image collections cleaned in three levels (basic, semantic, quality), with a row and a
reason for every input. `curate(sources, out)` is `genfoundry curate SRC... --out DIR`."""

from genfoundry.curation.filters import FILTERS, ImageFilter, MissingPackage, register
from genfoundry.curation.inputs import CurateError
from genfoundry.curation.run import curate

__all__ = ["FILTERS", "CurateError", "ImageFilter", "MissingPackage", "curate", "register"]
