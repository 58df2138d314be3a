"""Backbones and the classifier built on them: backbone sources (timm, torchvision) with
their weights and preprocessing, the new head, layer groups, head warm start."""
