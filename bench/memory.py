"""Peak RSS of `mention-indexer run` with 1,000,000 messages queued.

    .venv/bin/python bench/memory.py [--json] [--size small|full] [--messages 1000000]
                                     [--seconds 60] [--drain]

Publishes ``--messages`` events of the drain benchmark's mix into the service's own queue (its
type: quorum by default), then starts `python -m indexer run` as a subprocess with the default
settings (scratch names only) and lets it drain for ``--seconds`` (or, with ``--drain``, until the
queue is empty).  Its RSS is sampled every 0.2 s and its peak, the kernel's VmHWM, read before it
is stopped.  Figure: peak RSS < 200 MB.  Also printed: the RSS once ready, the growth over the
second half of the window (a leak shows there), and the drain rate of the subprocess.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

from _common import (
    Report,
    Scratch,
    declare,
    Indexer,
    info,
    mix_stream,
    parser,
    peak_rss_mb,
    publish_backlog,
    queue_depth,
    quiet_logging,
    rss_mb,
    settings_for,
    sized,
    tag,
)


def sample(pid: int, samples: list[tuple[float, float]], stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - started, rss_mb(pid)))
        except (OSError, RuntimeError):
            return
        stop.wait(0.2)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--messages", type=int, help="messages queued before the start (default 1,000,000; small: 5,000)")
    p.add_argument("--seconds", type=float, help="how long it drains (default 60; small: until empty)")
    p.add_argument("--drain", action="store_true", help="run until the queue is empty")
    args = p.parse_args()
    quiet_logging()
    messages = sized(args, "messages", 1_000_000, 5_000)
    seconds = sized(args, "seconds", 60.0, 30.0)
    drain = args.drain or args.size == "small"
    settings = settings_for(tag("memory"))
    report = Report("memory", "bench/memory.py " + " ".join(sys.argv[1:]))
    report.params.update(
        messages=messages, seconds=None if drain else seconds, drain=drain, prefetch=settings.prefetch,
        batch_messages=settings.batch_messages, queue_type=settings.queue_type,
    )
    with Scratch(settings) as scratch:
        scratch.service_names(settings)
        asyncio.run(declare(settings))
        info(f"publishing {messages:,} messages")
        publish_s = asyncio.run(publish_backlog(settings, mix_stream(messages), expect_in_queue=messages))
        info(f"published in {publish_s:.1f} s ({messages / publish_s:,.0f}/s); starting the indexer")
        indexer = Indexer(settings)
        process = indexer.process
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(process.pid, samples, stop), daemon=True)
        sampler.start()
        try:
            started = time.monotonic()
            indexer.wait_ready()
            ready_s = time.monotonic() - started
            ready_rss = rss_mb(process.pid)
            info(f"ready after {ready_s:.1f} s at {ready_rss:.0f} MB; draining")
            window_start = time.monotonic()
            remaining = messages
            while True:
                time.sleep(1.0)
                remaining = asyncio.run(queue_depth(settings))
                elapsed = time.monotonic() - window_start
                if (drain and remaining == 0) or (not drain and elapsed >= seconds) or process.poll() is not None:
                    break
            if drain:  # the last deliveries are in hand until their batch is acked
                time.sleep(1.0)
            elapsed = time.monotonic() - window_start
            peak = peak_rss_mb(process.pid)
            final = rss_mb(process.pid)
        finally:
            stop.set()
            log_tail = indexer.tail()
            code = indexer.stop()
        if code != 0:
            info(f"the indexer exited {code}: {log_tail}")
    drained = messages - remaining
    half = [rss for at, rss in samples if at >= ready_s + elapsed / 2]
    growth = (half[-1] - half[0]) if len(half) > 1 else 0.0
    measured: dict[str, Any] = {
        "publish_seconds": publish_s,
        "ready_seconds": ready_s,
        "ready_rss_mb": ready_rss,
        "final_rss_mb": final,
        "peak_rss_mb": peak,
        "growth_second_half_mb": growth,
        "window_seconds": elapsed,
        "drained": drained,
        "drain_rate": drained / elapsed if elapsed else 0.0,
        "left_in_queue": remaining,
        "rss_samples_mb": [round(rss, 1) for _, rss in samples[:: max(1, len(samples) // 60)]],
    }
    report.measurements.update(measured)
    report.note(
        f"ready at {ready_rss:.0f} MB; drained {drained:,} in {elapsed:.0f} s ({measured['drain_rate']:,.0f}/s) with"
        f" {remaining:,} still queued; RSS growth over the second half {growth:+.1f} MB; final {final:.0f} MB"
    )
    report.figure("peak_rss", peak, "MB", 200, "<=", f"issue target with {messages:,} messages queued")
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
