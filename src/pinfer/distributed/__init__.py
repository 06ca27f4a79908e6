"""Scale-out on standard engines: tensor parallelism (torch.distributed) and data-parallel replicas (Ray)."""
