"""Task shapes: everything that depends on what a label is (target encoding, loss, output
activation, metrics, decoding of predictions, the per-class views). `base.Task` is the
interface; `single_label.SingleLabel` its implementation for one class per image."""
