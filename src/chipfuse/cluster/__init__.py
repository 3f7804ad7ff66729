"""Describe the pool: chip catalog, pool files, detection of local devices."""

from chipfuse.cluster.catalog import Chip, get_chip, load_catalog
from chipfuse.cluster.pool import Device, Link, Node, Pool, load_pool, pool_from_dict

__all__ = ["Chip", "Device", "Link", "Node", "Pool", "get_chip", "load_catalog", "load_pool", "pool_from_dict"]
