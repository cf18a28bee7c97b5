"""Sparse dictionaries: their kinds, on-disk formats, training, quality metrics, building, dashboards and
the ground-truth benchmark."""
