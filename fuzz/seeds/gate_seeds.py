#!/usr/bin/env python3
"""Writes the seed inputs of the `gate` target into seeds/gate/.

The bytes follow the `arbitrary` 1.x encoding of `Vec<Step>` in fuzz_targets/gate.rs: each
element behind a keep-going byte (odd: one more), an enum as a little-endian u32 scaled onto its
variants, integers little-endian. Reorder the enums there and these seeds decode to something
else (harmless, but then rerun this script after updating the indices below).

    python3 seeds/gate_seeds.py   # from fuzz/
"""
import os
import struct

def variant(k, n):
    """A u32 that the derive maps to variant k of n."""
    return struct.pack("<I", ((2 * k + 1) << 32) // (2 * n))

STEP, METHOD, PATH, NAME, VALUE, PEER = 8, 9, 3, 4, 4, 3
GET, POST = 0, 2
# Indices into KNOWN_PATHS.
HEARTBEAT, USAGE, TEAMS_DEMO, TEAMS_OTHER, API = 2, 3, 4, 6, 8

def request(method, path, headers, peer=0):
    b = variant(method, METHOD) + variant(0, PATH) + bytes([path])
    for name, value in headers:
        b += b"\x01" + variant(name, NAME) + value
    return b + b"\x00" + variant(0, PEER) + bytes([peer])

DEMO = [(0, variant(0, VALUE))]  # x-api-key: <demo key>
# x-api-key: an sk_live_ key in the issued format, right checksum, unknown to the store.
UNKNOWN = [(0, variant(2, VALUE) + b"\x01" + bytes(range(1, 23)) + b"\x00")]

def step_request(*a, **k):
    return b"\x01" + variant(0, STEP) + request(*a, **k)

def step_burst(n, *a, **k):
    return b"\x01" + variant(1, STEP) + bytes([n]) + request(*a, **k)

def step_hours(h):
    return b"\x01" + variant(3, STEP) + bytes([h])

seeds = {
    # Heartbeat, then the API and the team's own resources with the demo key.
    "beat_then_api": step_request(POST, HEARTBEAT, DEMO)
    + step_request(GET, API, DEMO)
    + step_request(GET, TEAMS_DEMO, DEMO)
    + step_request(GET, TEAMS_OTHER, DEMO)
    + step_request(GET, USAGE, DEMO)
    + b"\x00",
    # Run the free plan (100/h) dry, then wait for the heartbeat to go stale.
    "beat_burst_stale": step_request(POST, HEARTBEAT, DEMO)
    + step_burst(120, GET, API, DEMO)
    + step_hours(49)
    + step_request(GET, API, DEMO)
    + b"\x00",
    # No key at all, then an unknown key from one address until it is blocked (600/min).
    "missing_then_unknown": step_request(GET, API, [])
    + step_burst(255, GET, API, UNKNOWN) * 3
    + b"\x00",
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate")
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
