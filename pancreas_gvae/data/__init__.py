"""The data stage: everything between a data source and the slices training reads.

- :mod:`pancreas_gvae.data.ct`: CT cohorts - discovery, checks, pairing, slice sets, preparation into the
  cache, the manifest, the phantom cohort and the TCIA download.
- :mod:`pancreas_gvae.data.idx`: read and write IDX files (the MNIST format), gzip-compressed or raw,
  with every structural problem reported as a :class:`~pancreas_gvae.errors.DataError`.
- :mod:`pancreas_gvae.data.mnist_files` (file names, mirrors, official MD5 checksums, checked downloads that
  work offline in tests) and :mod:`pancreas_gvae.data.mnist` (loading whichever splits are present).
"""
