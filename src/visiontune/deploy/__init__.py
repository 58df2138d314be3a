"""Using a trained run elsewhere: export (ONNX, TorchScript) and serve (FastAPI)."""
