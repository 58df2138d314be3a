"""The frozen backbone as a fixed function of the image: its features, computed once
(`FeatureExtractor`) and cached on disk in shards (features.py, shards.py), and the
converged linear probe fitted on them (probe.py), remembered by the digest of its inputs
(probememo.py). Training's frozen phases, the advisor, `suggest`, the cost model and
interpret all use it; nothing here trains a network."""
