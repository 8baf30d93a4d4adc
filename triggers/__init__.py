"""The functional core: pure, deterministic decisions.

`decide(state, input, now, ruleset, policy)` returns the new customer state, the
actions and decisions it produced, and when the customer next needs a timer.
No I/O, no wall clock, no Faust: the same code runs live and in replay.
"""
