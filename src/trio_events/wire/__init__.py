"""The WebSocket side of trio-events.

`trio_events.wire.protocol` is the sans-IO core of protocol v1: message types, encoding and
decoding, request and frame validation, and the per-connection replay state machine. It does no
I/O; the server and the client (being built) drive it.
"""
