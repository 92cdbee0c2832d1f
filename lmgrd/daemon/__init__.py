"""The running daemon (asyncio): transport, per-client sessions, the lease lifecycle (the only code that
grants or ends a seat), typed events, and the server shell. Imports ``lmgrd.core``, ``lmgrd.storage`` and
``protocol``; never ``lmgrd.admin`` or ``lmgrd.monitoring`` (they plug in through registries and observers).
"""
