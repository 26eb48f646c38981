"""Turning an ``nn.Module`` into a module: ``graft.save`` and the program encoder."""
