"""How the model runs on a device: wrapping for an execution strategy (DDP, compile), precision and backend
settings. `models/` stays plain PyTorch; everything here is applied to a built model from outside."""
