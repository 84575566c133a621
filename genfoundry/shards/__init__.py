"""Shards: images packed into WebDataset-layout tar shards with per-shard offsets and a checksummed
index, read back by global sample index from a local directory or any fsspec URL.

    from genfoundry.shards import pack, ShardDataset
    pack("photos/", "shards/photos", resolution=256, image_format="jpeg")
    data, meta = ShardDataset("shards/photos").read(0)

The format is described in docs/shards.md.
"""

from genfoundry.shards.index import FORMAT_VERSION, ShardError
from genfoundry.shards.pack import FORMATS, Input, Inputs, list_inputs, pack
from genfoundry.shards.reader import ShardDataset

__all__ = ["FORMATS", "FORMAT_VERSION", "Input", "Inputs", "ShardDataset", "ShardError", "list_inputs", "pack"]
