"""negmargin: few-shot image classification with Negative-Margin (Liu et al., ECCV 2020)."""

__version__ = "0.1.0"
