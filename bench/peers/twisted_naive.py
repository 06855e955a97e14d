"""The naive Twisted relay for the benchmark: spawnProcess, every dataReceived written into the
child at once. Nothing stops reading the socket while the child is slow: memory grows without
bound (the problem gsrv solves). Usage: python twisted_naive.py CMD [ARG...]; listens on
127.0.0.1, a free port (the benchmark finds it), backlog 1024."""

from __future__ import annotations

import shutil
import sys

from twisted.internet import protocol, reactor


class Child(protocol.ProcessProtocol):
    def __init__(self, client: Relay) -> None:
        self.client = client

    def outReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def processEnded(self, reason: object) -> None:
        self.client.transport.loseConnection()


class Relay(protocol.Protocol):
    def connectionMade(self) -> None:
        self.child = Child(self)
        argv = sys.argv[1:]
        reactor.spawnProcess(self.child, shutil.which(argv[0]) or argv[0], argv, env=None)

    def dataReceived(self, data: bytes) -> None:
        self.child.transport.write(data)

    def readConnectionLost(self) -> None:
        self.child.transport.closeStdin()

    def connectionLost(self, reason: object) -> None:
        if self.child.transport.pid:
            self.child.transport.signalProcess("TERM")


class Factory(protocol.Factory):
    protocol = Relay


if __name__ == "__main__":
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from zope.interface import classImplements

    classImplements(Relay, IHalfCloseableProtocol)
    reactor.listenTCP(0, Factory(), backlog=1024, interface="127.0.0.1")
    reactor.run()
