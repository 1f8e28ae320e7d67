"""Training: optimizer, loss, train/eval steps, loop."""
