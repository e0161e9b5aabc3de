"""Hostile clients against a running filter, each followed by the filter's memory (VmRSS and its
peak VmHWM from /proc): one 1 MiB frame of ~524 000 items, 1 200 idle connections, and a client
flooding invalid records without reading its answers. Standard library only.

Usage: abuse.py HOST PORT FILTER_PID DEAD_LETTER_FILE
Prints one line per case; exits 0 (the numbers are for a person or a script to judge).
"""

import base64
import os
import socket
import sys
import time

HOST, PORT, PID, DEAD = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


def memory():
    fields = {}
    with open(f"/proc/{PID}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields["VmRSS"], fields["VmHWM"]


def connect():
    sock = socket.create_connection((HOST, PORT), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (f"GET /ingest HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head else 0
    return sock, status


def frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes([0x81, 0x80 | n])
    elif n < 65536:
        header = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def big_frame():
    sock, status = connect()
    payload = ("[" + ",".join(["0"] * 524_000) + "]").encode()
    sock.sendall(frame(payload))
    sock.settimeout(30)
    answer = sock.recv(4096)
    time.sleep(1)
    rss, peak = memory()
    size = os.path.getsize(DEAD) if os.path.exists(DEAD) else 0
    print(f"big frame ({len(payload)} bytes, 524000 items): upgrade {status}, answer {answer[2:80]!r}, "
          f"dead-letter file {size} bytes, filter RSS {rss} (peak {peak})")
    sock.close()


def idle_connections(count=1200):
    socks, statuses = [], {}
    for _ in range(count):
        try:
            sock, status = connect()
            statuses[status] = statuses.get(status, 0) + 1
            socks.append(sock)
        except OSError as err:
            statuses[str(err)] = statuses.get(str(err), 0) + 1
    time.sleep(2)
    rss, peak = memory()
    print(f"{count} idle connections from one address: answers {statuses}, filter RSS {rss} (peak {peak})")
    for sock in socks:
        sock.close()


def flood(seconds=10):
    sock, status = connect()
    bad = ('{"id":"x","source":"flood","seq":1,"timestamp":"t","value":1,"hash":"zz"}').encode()
    batch = b"[" + b",".join([bad] * 1000) + b"]"
    sent, ended = 0, "still open"
    deadline = time.time() + seconds
    sock.settimeout(5)
    while time.time() < deadline:
        try:
            sock.sendall(frame(batch))
            sent += 1000
        except OSError as err:
            ended = f"closed by the filter ({err.__class__.__name__})"
            break
    rss, peak = memory()
    print(f"invalid-record flood without reading answers: {sent} records sent, {ended}, "
          f"filter RSS {rss} (peak {peak})")
    sock.close()


print(f"filter at start: RSS {memory()[0]}")
big_frame()
idle_connections()
flood()
