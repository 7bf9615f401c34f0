"""Attacks whose outputs are datasets the runner evaluates: PGD (transfer and adaptive) images, GCG suffixes."""
