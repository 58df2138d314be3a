"""Choosing among runs: k-fold cross-validation, strategies side by side, the advisor,
and the learning-rate range test."""
