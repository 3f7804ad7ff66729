"""The one training loop and what it reads: optimizer, recipe, metrics, evaluation."""
