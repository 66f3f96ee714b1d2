"""LoRA on NF4 weights: autograd functions, drop-in modules for nn.Linear, model conversion."""
