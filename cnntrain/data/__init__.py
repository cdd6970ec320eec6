"""Datasets: strict IDX reading, dataset lookup, the bundled sample, batch streaming."""
