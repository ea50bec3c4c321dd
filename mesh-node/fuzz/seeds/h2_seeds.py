#!/usr/bin/env python3
"""Writes the hbone_h2 seed corpus: HTTP/2 client frames after the preface (the fuzz
target sends the preface itself). Run from mesh-node/fuzz: python3 seeds/h2_seeds.py"""
import os
import struct

OUT = "corpus/hbone_h2"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    # HPACK literal header field without indexing, new name, no Huffman coding.
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def connect(authority):
    return literal(b":method", b"CONNECT") + literal(b":authority", authority)


settings = frame(SETTINGS, 0, 0)
settings_params = frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535) + struct.pack(">HI", 5, 16384))
seeds = {
    "connect": settings + frame(HEADERS, END_HEADERS, 1, connect(b"10.0.1.5:8080")),
    "connect_data": settings
    + frame(HEADERS, END_HEADERS, 1, connect(b"10.0.1.5:8080"))
    + frame(DATA, 0, 1, b"hello")
    + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
    + frame(DATA, END_STREAM, 1, b"bye"),
    "connect_v6_and_refused": settings_params
    + frame(HEADERS, END_HEADERS, 1, connect(b"[fd00::1:5]:80"))
    + frame(HEADERS, END_HEADERS, 3, connect(b"10.0.1.5:15008"))
    + frame(HEADERS, END_HEADERS, 5, connect(b"10.0.1.6:8080"))
    + frame(RST, 0, 1, struct.pack(">I", 8)),
    "connect_continuation": settings
    + frame(HEADERS, 0, 1, literal(b":method", b"CONNECT"))
    + frame(CONTINUATION, END_HEADERS, 1, literal(b":authority", b"10.0.1.5:8080")),
    # :method GET, :scheme http, :path / from the static table.
    "get": settings + frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x82\x86\x84" + literal(b":authority", b"10.0.1.5:8080")),
    "ping_goaway": settings + frame(PING, 0, 0, b"12345678") + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)),
}
os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
