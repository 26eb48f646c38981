"""graft.server"""
