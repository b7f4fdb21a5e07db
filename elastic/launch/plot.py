"""``elastic plot EVENTS.jsonl -o run.png``: a run drawn from its event log.

World size, loss and samples/s over time, with failures, joins, leaves,
checkpoints and recoveries marked on every panel. Needs matplotlib (the
``plot`` extra); drawn with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..base.errors import ConfigError, ElasticError
from ..base.events import Event, read_events

# Marker kind -> (colour, line style); one legend entry each.
MARKS = {
    "failure": ("tab:red", "-"),
    "join": ("tab:green", "--"),
    "leave": ("tab:orange", "--"),
    "checkpoint": ("tab:blue", ":"),
    "recovered": ("tab:purple", "-."),
}


@dataclass
class Series:
    """What a plot shows, in seconds since the log's first event."""

    step_t: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    world_t: list[float] = field(default_factory=list)
    world: list[int] = field(default_factory=list)
    rate_t: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    rate_unit: str = "samples/s"
    marks: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in MARKS})


def series(events: list[dict[str, Any]], window: int = 10) -> Series:
    """Curves and markers of a run; samples/s is averaged over ``window`` steps."""
    out = Series()
    if not events:
        return out
    t0 = min(float(e["t"]) for e in events)
    batch = None
    members: set[str] = set()
    failed_gens: set[int] = set()
    recent: list[tuple[float, int]] = []
    for ev in sorted(events, key=lambda e: float(e["t"])):
        t, kind = float(ev["t"]) - t0, ev.get("event")
        if kind == Event.STEP:
            out.step_t.append(t)
            out.loss.append(float(ev.get("loss") or 0.0))
            out.world_t.append(t)
            out.world.append(int(ev.get("world") or 0))
            recent = (recent + [(t, int(ev["step"]))])[-window:]
            (ta, sa), (tb, sb) = recent[0], recent[-1]
            if tb > ta and sb > sa:
                out.rate_t.append(t)
                out.rate.append((sb - sa) / (tb - ta) * (batch or 1))
        elif kind == Event.GENERATION:
            ids = set(ev.get("world") or [])
            batch = ev.get("global_batch", batch)
            if members and ids - members:
                out.marks["join"].append(t)
            members = ids
            out.world_t.append(t)
            out.world.append(len(ids))
            recent = []  # the pause for re-forming is not throughput
        elif kind == Event.FAILURE:
            gen = int(ev.get("gen", -1))
            if gen not in failed_gens:  # every survivor reports the same failure
                failed_gens.add(gen)
                out.marks["failure"].append(t)
        elif kind == Event.LEAVE:
            out.marks["leave"].append(t)
        elif kind == Event.CHECKPOINT and ev.get("final") or kind == Event.CHECKPOINT_COMMITTED:
            out.marks["checkpoint"].append(t)
        elif kind == Event.RECOVERED:
            out.marks["recovered"].append(t)
    if batch is None:
        out.rate_unit = "steps/s"  # a log written before the batch size was recorded
    return out


def plot_events(path: str, out: str, *, title: str | None = None) -> Series:
    """Draw the run in ``path`` into the image ``out``; returns what was drawn."""
    if not os.path.isfile(path):
        raise ConfigError(f"event log {path!r} does not exist")
    data = series(read_events(path))
    if not data.step_t:
        raise ConfigError(f"event log {path!r} holds no step events (rank 0 writes them)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ElasticError(
            "elastic plot needs matplotlib: pip install 'elastic-runtime[plot]' "
            "(or pip install matplotlib)"
        ) from exc

    fig, (ax_w, ax_l, ax_r) = plt.subplots(3, 1, sharex=True, figsize=(8, 6.5), dpi=100)
    try:
        ax_w.step(data.world_t, data.world, where="post", color="black")
        ax_w.set_ylabel("world size")
        ax_w.set_ylim(0, max(data.world) + 1)
        ax_l.plot(data.step_t, data.loss, color="tab:brown")
        ax_l.set_ylabel("loss")
        if min(data.loss) > 0:
            ax_l.set_yscale("log")
        ax_r.plot(data.rate_t, data.rate, color="tab:cyan")
        ax_r.set_ylabel(data.rate_unit)
        ax_r.set_ylim(bottom=0)
        ax_r.set_xlabel("seconds since the first event")
        for kind, times in data.marks.items():
            colour, style = MARKS[kind]
            for i, t in enumerate(times):
                for ax in (ax_w, ax_l, ax_r):
                    ax.axvline(
                        t,
                        color=colour,
                        linestyle=style,
                        linewidth=1.2,
                        label=kind if ax is ax_w and i == 0 else None,
                    )
        if any(data.marks.values()):
            ax_w.legend(loc="lower left", fontsize="small", ncol=len(MARKS))
        fig.suptitle(title or os.path.basename(path))
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return data
