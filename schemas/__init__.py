"""Omnicue's contracts: events in, actions and decisions out, and the rules file.

Pydantic v2 models only; nothing here imports Faust, Kafka or Redis.
"""
