"""From a path to tensors: scanning and splitting labelled images (sources), decoding
(images), preprocessing and augmentation (preprocess, transforms), datasets, loaders and
the decoded-image cache (loaders), and time series drawn as images (imagify)."""
