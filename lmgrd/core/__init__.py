"""The daemon's decisions: pure and synchronous, time passed in.

Ledger (seats, leases, waiters, expiry), usage policy, site networks, licensing (every check in the
documented refusal order, and the reload merge) and the activation rules. No asyncio, sockets, files,
clock reads or logging setup. Imports only ``protocol`` and the standard library.
"""
