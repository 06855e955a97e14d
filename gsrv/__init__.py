"""gsrv: a gevent server that streams each TCP connection through a command.

Bounded memory per session, backpressure both ways, a memory guard on accept.
"""

__version__ = "0.1.0"
