"""The composition root: settings, HTTP app, model worker, metrics and the `ragadapt` command line."""
