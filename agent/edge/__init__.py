"""The edge agent: next to the hardware, it holds the root identity and grants authority."""
