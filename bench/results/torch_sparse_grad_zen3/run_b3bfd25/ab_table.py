import sys, re, collections, numpy as np
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    tag = line.split()[0]
    if tag not in ("old", "new"): continue
    for part in line.split(" ", 2)[2].split(" | "):
        name, v = part.rsplit(": ", 1)
        rows[name][tag].append(float(v))
print("| what | old (us) | new (us) | old/new per pair |")
print("|---|---|---|---|")
for name, d in rows.items():
    r = [o / n for o, n in zip(d["old"], d["new"])]
    print(f"| {name} | {', '.join(f'{v:.0f}' for v in d['old'])} | {', '.join(f'{v:.0f}' for v in d['new'])} | {', '.join(f'{v:.2f}x' for v in r)} |")
