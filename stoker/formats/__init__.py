"""The write path and the shard formats: schema, manifest, shard readers and writers, packing.

Importing the package registers every shard format with `shard.register_format`.
"""

from stoker.formats import arrow_shard, msgpack_shard  # noqa: F401  (each registers its format)
