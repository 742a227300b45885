#!/usr/bin/env python3
# Issue 16 item 2, measured: the server under `prlimit --nofile=256:256`; 233 clients each send
# GET /health, then one byte of a second head every 10 s. Meanwhile a client asks GET /health on
# a new connection every 0.5 s for 60 s (10 s timeout each). Usage: bench/slow-clients.py BINARY [CLIENTS]
import os, re, socket, subprocess, sys, tempfile, threading, time

binary = sys.argv[1]
attackers_wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 233
state = tempfile.mkdtemp()
env = dict(os.environ, LOCKER_CONFIG=state + "/locker.yml", PORT="0",
           LOCKER_LISTEN="127.0.0.1", RUST_LOG="info")
server = subprocess.Popen(["prlimit", "--nofile=256:256", binary], env=env,
                          stderr=subprocess.PIPE, text=True)
address = None
log = []
for line in server.stderr:
    log.append(line)
    m = re.search(r"listening on http://(\S+)", line)
    if m:
        address = m.group(1)
        break
threading.Thread(target=lambda: [log.append(l) for l in server.stderr], daemon=True).start()
host, port = address.rsplit(":", 1)
port = int(port)
attackers = []
for _ in range(attackers_wanted):
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        attackers.append(s)
    except OSError:
        pass
closed_at = {}
started = time.time()

def trickle():
    head = b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    for i in range(len(head)):
        for n, s in enumerate(attackers):
            if n in closed_at:
                continue
            try:
                s.send(head[i:i + 1])
            except OSError:
                closed_at[n] = time.time() - started
        time.sleep(10)

threading.Thread(target=trickle, daemon=True).start()
ok = failed = 0
slowest = 0.0
end = time.time() + 60
while time.time() < end:
    asked = time.time()
    try:
        c = socket.create_connection((host, port), timeout=10)
        c.settimeout(10)
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = c.recv(100)
        c.close()
        if answer.startswith(b"HTTP/1.1 200"):
            ok += 1
        else:
            failed += 1
    except OSError:
        failed += 1
    slowest = max(slowest, time.time() - asked)
    time.sleep(0.5)
# Attackers the server had closed by now (a send fails only after the close is seen).
for n, s in enumerate(attackers):
    if n not in closed_at:
        try:
            s.settimeout(0.01)
            if s.recv(65536) == b"":
                closed_at[n] = None
        except OSError:
            pass
server.kill()
emfile = sum("Too many open files" in l for l in log)
print(f"{os.path.basename(binary)}: {len(attackers)} slow clients connected; /health {ok} ok, "
      f"{failed} failed, slowest {slowest:.2f} s; slow clients closed by the server after 60 s: "
      f"{len(closed_at)}; 'Too many open files' log lines: {emfile}")
