"""Reference implementations of the custom ops: plain PyTorch, CPU and CUDA, defining the semantics."""
