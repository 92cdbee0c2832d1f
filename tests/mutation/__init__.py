"""Mutation testing of the core paths (``make mutation``); see ``run.py``."""
