"""What a module is: specs and manifest, export, load, the runtime, preprocessing."""
