"""cachefs: a read-only FUSE view of an object-store prefix, cached in memory and on local SSD."""

__version__ = '0.1.0'
