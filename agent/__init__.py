"""agent: the edge agent, the cloud agent service, envelopes, transports and the CLI."""
