"""Running a module: ``graft.Module``, the program runner (no generated code), preprocessing."""
