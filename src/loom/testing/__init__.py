"""Test and benchmark helpers that run real services (a tool server for agents)."""
