#!/usr/bin/env python3
"""Writes a synthetic policy with N rules to stdout, mixed like a fleet's:
mostly SHA-256 rules, 1 % team-id and 1 % path rules, up to 500 glob and 500
name rules, a tenth user-scoped. None of them matches /bin/true, so every
exec in the benchmark is a full evaluation that ends in the default action."""
import hashlib
import json
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
special = max(n // 100, 4)
globs = min(max(n // 200, 2), 500)
rules = []
for i in range(n):
    if i < special:
        match = {"team_id": f"T{i:09d}"}
    elif i < 2 * special:
        match = {"path": f"/usr/local/bin/tool{i}"}
    elif i < 2 * special + globs:
        match = {"path_glob": f"/opt/vendor{i}/**"}
    elif i < 2 * special + 2 * globs:
        match = {"name": f"tool-{i}"}
    else:
        match = {"sha256": hashlib.sha256(str(i).encode()).hexdigest()}
    rule = {"id": f"r{i}", "action": ["allow", "deny", "justify", "approve"][i % 4], "match": match}
    if i % 10 == 9:
        rule["scope"] = {"users": [f"user{i % 50}"]}
    rules.append(rule)
json.dump({"version": 1, "default_action": "allow", "rules": rules}, sys.stdout)
