"""Planning is pure: a pool and model costs in, a Plan out. No torch.distributed here."""
