"""How ranks combine gradients: bucketed reductions per vendor, DiLoCo islands."""
