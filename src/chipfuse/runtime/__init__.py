"""Apply a plan to a model and train it on torch.distributed."""
