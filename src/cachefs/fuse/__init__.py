"""The FUSE layer: pyfuse3 request handlers over the namespace tree and the block cache."""
