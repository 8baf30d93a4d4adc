"""The thin Faust shell around the `triggers` core; the only package importing `faust`."""
