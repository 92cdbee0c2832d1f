"""The state directory and the files the daemon reads: lease journal, license, revocation and activation
files, and the one atomic-write helper. Synchronous I/O; imports ``lmgrd.core`` and ``protocol`` only.
"""
