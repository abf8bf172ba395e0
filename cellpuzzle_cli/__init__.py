"""cellpuzzle: single-cell RNA-seq to a trained, evaluated LLM cell-type annotator."""

__version__ = "0.1.0"
