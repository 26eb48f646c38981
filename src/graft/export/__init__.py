"""graft.export"""
