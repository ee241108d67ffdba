"""Data loading for pancreas-gvae.

- :mod:`pancreas_gvae.data.idx`: read and write IDX files (the MNIST format), gzip-compressed or raw,
  with every structural problem reported as a :class:`~pancreas_gvae.errors.DataError`.
- :mod:`pancreas_gvae.data.mnist`: MNIST and Fashion-MNIST (file names, mirrors, official MD5 checksums),
  checked downloads that work offline in tests, and loading of whichever splits are present.
"""
