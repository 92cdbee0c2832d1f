"""The vendor's side: issuing (``lmissue``), request checking and signing with the private key, and the
demo. Never imported by the daemon.
"""
