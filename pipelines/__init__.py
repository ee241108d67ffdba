"""Command-line pipelines, installed as ``pancreas_gvae.pipelines``; each has ``main()`` and a ``pgvae-*`` script."""
