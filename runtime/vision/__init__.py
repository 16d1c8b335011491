"""Vision encoders (ONNX Runtime, PyTorch, TensorRT) and their cache."""
