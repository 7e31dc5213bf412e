"""The record of a GPU check: a step's outcome (:class:`Failed`, :class:`Skipped`), OUT/gpu_check.json
written as each step starts and ends (:class:`Report`), and the table printed at the end."""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path


class Failed(Exception):
    """A step's check did not hold; ``numbers`` are still recorded."""

    def __init__(self, message: str, numbers: dict | None = None):
        super().__init__(message)
        self.numbers = numbers or {}


class Skipped(Exception):
    """A step that cannot run here (no second GPU, a missing input); the message says why."""


def json_safe(value):
    """``value`` with non-finite floats as strings ("nan", "inf"): strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Report:
    """OUT/gpu_check.json, rewritten (atomically) whenever a step starts or ends.

    A step record is ``{name, ok, status, seconds, summary, numbers, error}``: ``ok`` is true or false,
    or null for a step that was skipped (``error`` then says why) or is still running."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.doc = {
            "check": "ssd gpu_check",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished": None,
            **meta,
            "steps": [],
        }
        self.t0 = time.perf_counter()
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(json_safe(self.doc), indent=1) + "\n")
        os.replace(tmp, self.path)

    def run(self, name: str, fn: Callable, *args) -> dict:
        """Run ``fn(*args)``, record its numbers or its failure, and write the file before and after."""
        rec = self._add(name, "running")
        t0 = time.perf_counter()
        try:
            rec["numbers"] = dict(fn(*args) or {})
            rec.update(ok=True, status="ok")
        except Skipped as e:
            rec.update(status="skipped", error=str(e))
        except Failed as e:
            rec.update(ok=False, status="failed", numbers=e.numbers, error=str(e))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a time limit): say so, then stop
            rec.update(ok=False, status="interrupted", error="interrupted")
            raise
        except Exception as e:  # a bug or an unexpected error: record it, go on with the next step
            rec.update(ok=False, status="failed", error=f"{type(e).__name__}: {e}")
            rec["traceback"] = traceback.format_exc(limit=-4)
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            rec["summary"] = str(rec["numbers"].pop("summary", ""))
            self.write()
        return rec

    def skip(self, name: str, reason: str) -> dict:
        return self._add(name, "skipped", error=reason, seconds=0.0)

    def _add(self, name: str, status: str, error: str | None = None, seconds: float | None = None) -> dict:
        rec = {"name": name, "ok": None, "status": status, "seconds": seconds}
        rec.update(summary="", numbers={}, error=error)
        self.doc["steps"].append(rec)
        self.write()
        return rec

    def finish(self) -> None:
        counts = status_counts(self.doc["steps"], ("ok", "failed", "skipped", "interrupted"))
        self.doc.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            seconds=round(time.perf_counter() - self.t0, 1),
            result=counts,
        )
        self.write()

    @property
    def failed(self) -> bool:
        return any(r["ok"] is False for r in self.doc["steps"])

    def table(self) -> str:
        return format_table(self.doc, self.path)


def format_table(doc: dict, path: Path, width: int = 120) -> str:
    """One line per step of a gpu_check.json document (result, seconds, summary or error), a count,
    then every error in full."""
    steps = doc["steps"]
    name_w = max([len("step")] + [len(r["name"]) for r in steps])
    room = width - name_w - 23
    lines = [f"{'step':<{name_w}}  {'result':<11} {'seconds':>7}  summary"]
    for r in steps:
        text = r["summary"] if r["status"] == "ok" else (r["error"] or "")
        text = text if len(text) <= room else text[: room - 3] + "..."
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"{r['name']:<{name_w}}  {r['status']:<11} {seconds:>7}  {text}")
    count = status_counts(steps, ("ok", "failed", "skipped", "running"))
    total = sum(r["seconds"] or 0 for r in steps)
    counts = ", ".join(f"{n} {s}" for s, n in count.items() if n or s != "running")
    lines.append(f"{counts} in {total:.0f} s; record: {path}")
    lines += [f"\n{r['name']} failed: {r['error']}" for r in steps if r["ok"] is False]
    return "\n".join(lines)


def status_counts(steps: list[dict], statuses: tuple[str, ...]) -> dict[str, int]:
    """How many of the step records have each of ``statuses``."""
    return {s: sum(r["status"] == s for r in steps) for s in statuses}
