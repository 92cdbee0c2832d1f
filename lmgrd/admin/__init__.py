"""Admin commands (``lmutil`` over the wire): the registry, the handlers and the admin token. Handlers see
the daemon through the typing Protocols in :mod:`lmgrd.daemon.api`, never its classes.
"""
