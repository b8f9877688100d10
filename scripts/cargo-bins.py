#!/usr/bin/env python3
"""Reads `cargo build --message-format=json` on stdin and prints NAME=PATH for every binary that
this build produced (the `executable` field of each compiler-artifact message), so scripts run the
binaries of this build and never a leftover of an earlier one. Compiler diagnostics are rendered
by cargo itself (json-render-diagnostics) and pass through on stderr."""
import json
import sys

seen = {}
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        if "bin" in msg.get("target", {}).get("kind", []):
            seen[msg["target"]["name"]] = msg["executable"]
for name, path in sorted(seen.items()):
    print(f"{name}={path}")
