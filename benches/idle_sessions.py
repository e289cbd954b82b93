#!/usr/bin/env python3
"""Holds N idle Postgres sessions open against a proxy that asks for no password (dbward), for
benches/pgbench.sh to read the proxy's RSS with them open.

usage: idle_sessions.py PORT COUNT DBNAME USER [tls]

Each session sends a StartupMessage (after an SSLRequest and a TLS handshake with "tls", the
certificate not verified: the bench uses a throwaway one) and reads up to ReadyForQuery. Prints
"ready N" once all are open, then waits for stdin to close and ends them with Terminate.
"""
import socket
import ssl
import struct
import sys


def startup(port, dbname, user, tls):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if tls:
        s.sendall(struct.pack("!ii", 8, 80877103))
        if s.recv(1) != b"S":
            raise SystemExit("the server refused TLS")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = ctx.wrap_socket(s)
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", dbname), ("application_name", "idle_sessions")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)
    buf = b""
    while True:
        while len(buf) >= 5:
            tag, n = buf[0:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + n:
                break
            if tag == b"E":
                raise SystemExit("session refused: %r" % buf[5 : 1 + n])
            if tag == b"Z":
                return s
            buf = buf[1 + n :]
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the session during startup")
        buf += chunk


def main():
    port, count, dbname, user = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tls = len(sys.argv) > 5 and sys.argv[5] == "tls"
    sessions = [startup(port, dbname, user, tls) for _ in range(count)]
    print("ready", len(sessions), flush=True)
    sys.stdin.read()
    for s in sessions:
        try:
            s.sendall(b"X\0\0\0\4")
            s.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
