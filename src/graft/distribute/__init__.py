"""graft.distribute"""
