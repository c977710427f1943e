"""Probes and one-off studies (experiments/README.md): `python -m experiments.<name>` from the repository root."""
