"""Failover in pictures: acknowledged writes and failed attempts over time.

    plot.py WRITER_DIR OUT_DIR

For each failover event bench/run recorded (switchover, kill, and the same
on a second stack, e.g. switchover@current), draws the first repetition's
writer through rolegate, HAProxy and a client with no proxy (libpq
multi-host), one panel each on the same time axis, time 0 being the moment
bench/run started the event. Writes OUT_DIR/failover-EVENT.png (an "@" in
the event's name becomes "-"). Runs in a venv with matplotlib from PyPI
(bench/run makes it); reads only the writer-*.json files.
"""

import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGETS = [("rolegate", "rolegate"), ("haproxy", "HAProxy (Patroni's documented setup)"),
           ("direct", "no proxy (libpq multi-host, target_session_attrs=read-write)")]
BIN_S = 0.1
FAILURE_COLOURS = {"connect": "#cf222e", "read-only": "#9a6700", "ended": "#8250df"}
EVENT_TITLES = {"switchover": "switchover (patronictl switchover)",
                "kill": "leader killed (kill -9 of its Patroni and PostgreSQL)"}


def load(writer_dir, event, target):
    path = os.path.join(writer_dir, f"writer-{event}-{target}-1.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        run = json.load(f)
    return run if "timeline" in run else None


def events_in(writer_dir):
    names = set()
    for path in glob.glob(os.path.join(writer_dir, "writer-*-1.json")):
        base = os.path.basename(path)[len("writer-"):-len("-1.json")]
        event, _, _target = base.rpartition("-")
        names.add(event)
    return sorted(names)


def draw(writer_dir, event, out_dir):
    runs = [(label, load(writer_dir, event, target)) for target, label in TARGETS]
    runs = [(label, run) for label, run in runs if run is not None]
    if not runs:
        return None
    end = max(max(run["timeline"]["acks"] + [0]) for _, run in runs)
    start = min(min(run["timeline"]["acks"] + [0]) for _, run in runs)
    bins = [start + i * BIN_S for i in range(int((end - start) / BIN_S) + 2)]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.3 * len(runs) + 0.8), sharex=True)
    if len(runs) == 1:
        axes = [axes]
    base, _, stack = event.partition("@")
    title = EVENT_TITLES.get(base, base)
    fig.suptitle(f"{title}{' on the ' + stack + ' stack' if stack else ''}: "
                 f"a writer inserting every 20 ms", fontsize=11)
    for ax, (label, run) in zip(axes, runs):
        timeline = run["timeline"]
        ax.hist(timeline["acks"], bins=bins, color="#1a7f37", label="acknowledged writes per 100 ms")
        for kind, colour in FAILURE_COLOURS.items():
            times = [t for t, k in timeline["failures"] if k == kind]
            if times:
                ax.plot(times, [-0.6] * len(times), "|", color=colour, markersize=9,
                        label=f"failed: {kind} ({len(times)})")
        ax.axvline(0, color="#59636e", linestyle="--", linewidth=1)
        ax.set_ylim(-1.5, 6.5)
        ax.set_yticks([0, 5])
        ax.set_title(f"{label}: longest gap {run['window_ms'] / 1000:.2f} s, "
                     f"{run['connect_failures']} failed connects, missing rows {run['missing']}",
                     fontsize=9, loc="left")
        ax.legend(loc="upper right", fontsize=7, ncol=4, frameon=False)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since the event started (dashed line)")
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"failover-{event.replace('@', '-')}.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    writer_dir, out_dir = sys.argv[1:]
    drawn = [draw(writer_dir, event, out_dir) for event in events_in(writer_dir)]
    drawn = [d for d in drawn if d]
    if not drawn:
        sys.exit(f"plot.py: no writer-*-1.json with a timeline in {writer_dir}")
    for path in drawn:
        print(path)


if __name__ == "__main__":
    main()
