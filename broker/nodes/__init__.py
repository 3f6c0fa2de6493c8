"""Provider nodes: the machines agents run on, their health, and the offers they publish."""
