"""What station and central agree on: the wire contract. Standard library only."""
