"""The Twisted relay done right, for the benchmark: producers and consumers both ways (the
socket pauses while the child's stdin is full, the child's stdout pauses while the client is
slow), half-close handled. Usage: python twisted_pc.py CMD [ARG...]; 127.0.0.1, a free port,
backlog 1024."""

from __future__ import annotations

import shutil
import sys

from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Stdout:
    """The child's stdout as a producer the client socket can pause."""

    def __init__(self, process: object) -> None:
        self.process = process

    def pauseProducing(self) -> None:
        self.process.pauseProducing()

    def resumeProducing(self) -> None:
        self.process.resumeProducing()

    def stopProducing(self) -> None:
        self.process.loseConnection()


class Child(protocol.ProcessProtocol):
    def __init__(self, client: Relay) -> None:
        self.client = client

    def connectionMade(self) -> None:
        # the child's stdin throttles the client socket; the client socket throttles stdout
        self.transport.registerProducer(self.client.transport, True)
        self.client.transport.registerProducer(Stdout(self.transport), True)
        self.client.transport.resumeProducing()

    def outReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def processEnded(self, reason: object) -> None:
        self.client.transport.unregisterProducer()
        self.client.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Relay(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # until the child is there to take bytes
        self.child = Child(self)
        argv = sys.argv[1:]
        reactor.spawnProcess(self.child, shutil.which(argv[0]) or argv[0], argv, env=None)

    def dataReceived(self, data: bytes) -> None:
        self.child.transport.write(data)

    def readConnectionLost(self) -> None:
        # unregister first: closing stdin would otherwise "stop" its producer, the client socket
        self.child.transport.unregisterProducer()
        self.child.transport.closeStdin()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        if self.child.transport.pid:
            self.child.transport.signalProcess("TERM")


class Factory(protocol.Factory):
    protocol = Relay


if __name__ == "__main__":
    reactor.listenTCP(0, Factory(), backlog=1024, interface="127.0.0.1")
    reactor.run()
