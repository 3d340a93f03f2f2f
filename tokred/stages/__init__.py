"""The runtime of each stage and the Session that wires them into a model."""
