"""A WebSocket client written from docs/contracts.md §2 alone, in another language than the services.

It talks to a running filter and checks that every answer is exactly what the contract
promises: acks for valid records (single and batch), rejects with the seq and a reason naming the
field, rejects with a null seq for frames that are not records, close code 1009 for an oversized
frame, and HTTP 401 without the bearer token.

Usage: spec_client.py WS_URL TOKEN MAX_FRAME_BYTES
"""

import hashlib
import json
import sys
import uuid
from datetime import datetime, timezone

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

URL, TOKEN, MAX_FRAME = sys.argv[1], sys.argv[2], int(sys.argv[3])
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SOURCE = "py-" + uuid.uuid4().hex[:8]
failures = []
checks = []


def check(name, ok, detail=""):
    checks.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if not ok else ''}")
    if not ok:
        failures.append(name)


def record(seq, value):
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{datetime.now(timezone.utc).microsecond // 1000:03d}Z"
    digest = hashlib.md5(f"{ts}|{value}".encode()).hexdigest()
    return {"id": str(uuid.uuid4()), "source": SOURCE, "seq": seq, "timestamp": ts, "value": value, "hash": digest[-2:]}


def answers(ws, count):
    got = []
    while sum(len(a.get("seqs", [None])) for a in got) < count:
        got.append(json.loads(ws.recv(timeout=20)))
    return got


with connect(URL, additional_headers=AUTH) as ws:
    ws.send(json.dumps(record(1, 42)))
    check("a single record is acked", answers(ws, 1) == [{"type": "ack", "seqs": [1]}])

    ws.send(json.dumps([record(seq, seq % 101) for seq in range(2, 52)]))
    acked = sorted(s for a in answers(ws, 50) if a["type"] == "ack" for s in a["seqs"])
    check("every record of a batch is acked once", acked == list(range(2, 52)), acked)

    bad = record(52, 50)
    bad["value"] = 101
    ws.send(json.dumps(bad))
    reply = json.loads(ws.recv(timeout=20))
    check("an out-of-range value is rejected with its seq", reply.get("type") == "reject" and reply.get("seq") == 52, reply)
    check("the reject names the field", "`value`" in reply.get("error", ""), reply)

    extra = record(53, 10)
    extra["colour"] = "red"
    ws.send(json.dumps(extra))
    reply = json.loads(ws.recv(timeout=20))
    check("an unknown field is rejected", reply.get("type") == "reject" and reply.get("seq") == 53, reply)

    ws.send("definitely not json")
    reply = json.loads(ws.recv(timeout=20))
    check("a frame that is not JSON is rejected with seq null", reply == {"type": "reject", "seq": None, "error": reply.get("error")} and reply["error"], reply)

    ws.send(b"\x00\x01binary")
    reply = json.loads(ws.recv(timeout=20))
    check("a binary frame is rejected with seq null", reply.get("type") == "reject" and reply.get("seq") is None, reply)

try:
    with connect(URL, max_size=None, additional_headers=AUTH) as ws:
        ws.send("x" * (MAX_FRAME + 1))
        ws.recv(timeout=20)
        check("an oversized frame closes with 1009", False, "no close")
except ConnectionClosed as closed:
    code = closed.rcvd.code if closed.rcvd else None
    check("an oversized frame closes with 1009", code == 1009, code)

for headers, label in [({}, "no token"), ({"Authorization": "Bearer wrong"}, "a wrong token")]:
    try:
        with connect(URL, additional_headers=headers):
            check(f"{label} is refused with 401", False, "connected")
    except InvalidStatus as refused:
        check(f"{label} is refused with 401", refused.response.status_code == 401, refused.response.status_code)

passed = len(checks) - len(failures)
print(f"protocol: {passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
