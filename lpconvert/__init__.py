"""lpconvert: pretrained causal LM -> layer-parallel checkpoint, no retraining."""

__version__ = "0.1.0"
