"""graft.zoo"""
