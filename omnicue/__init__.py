"""Omnicue: settings, CLI, metrics, producer client, dev stack and senders."""
