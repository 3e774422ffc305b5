"""Training with DeepSeek-V2's recipe: settings (config.py), the loop (trainer.py), the optimizer and schedule,
balance losses and token dropping, run directories and checkpoints, data, upcycling."""
