"""The provider agent: runs on a provider's machine, lists what its hardware really is
as offers, and runs the jobs the market matches to it (``broker agent``)."""

from broker.agent.node import AgentConfig, AgentStopped, NodeAgent, parse_prices

__all__ = ["AgentConfig", "AgentStopped", "NodeAgent", "parse_prices"]
