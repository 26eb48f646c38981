"""graft.train"""
