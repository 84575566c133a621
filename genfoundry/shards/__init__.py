"""Shards: pack images into WebDataset-layout tar shards with offsets and a checksummed index; read them
back by global sample index, locally or from any fsspec URL."""

from genfoundry.shards.index import FORMAT_VERSION, ShardError
from genfoundry.shards.pack import list_inputs, pack
from genfoundry.shards.reader import ShardDataset

__all__ = ["FORMAT_VERSION", "ShardDataset", "ShardError", "list_inputs", "pack"]
