"""Did it work? Conversions, attribution, lift, funnels and paths (issue 13).

Pure: these functions take touches, conversions and decisions already read by a
shell (`omnicue report`, and later the customer agent) and return numbers. No I/O,
no clock; imports only `schemas` and the standard library.
"""
