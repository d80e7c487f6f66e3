"""Entry points of grip-loop: the `grip` command line and the Lightning training loop.

The library (`grip_loop/`) never parses argv; everything that does lives here.
"""
