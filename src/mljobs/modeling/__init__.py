"""Distributed training on a job's Ray cluster: see :mod:`mljobs.modeling.distributors`."""
