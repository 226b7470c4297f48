"""Graph topologies for decentralized learning (networkx only; see the topology issue)."""
