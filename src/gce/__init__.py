"""gce: deep metric learning with Group Channel-wise Ensembles."""

__version__ = "0.1.0"
