"""Scale-out on torch.distributed: expert parallelism and data parallelism, applied to the model from outside."""
