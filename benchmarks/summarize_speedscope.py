#!/usr/bin/env python3
"""Top functions (self and inclusive share of samples) of a py-spy speedscope profile, all threads together
(`python benchmarks/summarize_speedscope.py OUT/core.speedscope.json [N]` after benchmarks/profile_served.sh --format speedscope);
the samples as py-spy recorded them (time a thread spent in select / poll counts where py-spy saw it active)."""
import json, sys, collections
data = json.load(open(sys.argv[1]))
frames = data["shared"]["frames"]
n_top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
total = 0
self_c, incl_c = collections.Counter(), collections.Counter()
per_thread = collections.Counter()
for prof in data["profiles"]:
    weights = prof.get("weights") or [1] * len(prof["samples"])
    for stack, w in zip(prof["samples"], weights):
        total += w
        per_thread[prof.get("name", "?")] += w
        if not stack:
            continue
        names = [f'{frames[i]["name"]} ({frames[i].get("file","").split("site-packages/")[-1].split("/work/main/")[-1]}:{frames[i].get("line","")})' for i in stack]
        self_c[names[-1]] += w
        for name in set(names):
            incl_c[name] += w
print(f"samples {total}")
print("threads:", ", ".join(f"{k} {v/total:.0%}" for k, v in per_thread.most_common(8)))
print("\nself (top):")
for name, c in self_c.most_common(n_top):
    print(f"  {c/total:6.1%}  {name}")
print("\ninclusive (top):")
for name, c in incl_c.most_common(n_top):
    print(f"  {c/total:6.1%}  {name}")
