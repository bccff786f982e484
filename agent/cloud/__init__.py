"""The cloud agent: an HTTP service acting under capabilities with one key per grant."""
