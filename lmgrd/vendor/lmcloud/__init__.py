"""``lmcloud``: the vendor's activation service (online activation, check-in, remote deactivation).

The vendor side, beside ``lmissue``: imports ``protocol`` and ``lmgrd.storage``/``lmgrd.vendor`` helpers, never the
daemon's modules (``lmgrd.daemon``, ``lmgrd.admin``, ``lmgrd.monitoring``, ``lmgrd.cli``). Its HTTP API is
``docs/CLOUD_API.md``; the documents it signs and reads are ``protocol.cloud``.
"""
