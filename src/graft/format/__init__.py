"""What a module IS on disk: manifest, specs, programs, and the checks on untrusted bytes.

Nothing here imports torch or any other layer of Graft but ``errors``.
"""
