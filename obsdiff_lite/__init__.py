"""obsdiff_lite: an executable companion to OBS-Diff (arXiv 2510.06751)."""
__version__ = "0.1.0"
