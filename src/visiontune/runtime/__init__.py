"""How tensors run: devices and precision, inference over a loader, batch sizes and
out-of-memory recovery, and the multi-process environment. Used by training, evaluation,
prediction and the analysis tools alike; imports nothing of the training loop."""
