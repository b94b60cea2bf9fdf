"""distrib: distributed image-classifier training for cascades of vision models."""

__version__ = "0.1.0"
