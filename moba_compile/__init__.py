"""moba-compile: MoBA (Mixture of Block Attention) for any PyTorch model through ``torch.compile(backend="moba")``."""
