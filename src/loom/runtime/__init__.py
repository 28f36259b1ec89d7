"""The inferlet runtime: drives the engine on behalf of user programs."""
