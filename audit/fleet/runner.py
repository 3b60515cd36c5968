"""Start the fleet, drive load through its entry point, stop it, and gather the truth."""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from .services import KAFKA_CONSUMERS, TOPIC_CREATED, run_service

ROLES = (
    "proxy",
    "cart",
    "recommendations",
    "pricing",
    "inventory",
    "payments",
    "fulfilment",
    "notifications",
    "auditor",
    "frontend",
    "billing-cron",
)


@dataclass
class FleetRun:
    requests: int
    failed: int
    truth_records: int


def _free_ports(names) -> dict[str, int]:
    socks, ports = [], {}
    for name in names:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports[name] = s.getsockname()[1]
    for s in socks:
        s.close()
    return ports


def run_fleet(
    otlp_endpoint: str,
    truth_path: str,
    *,
    seconds: float = 60.0,
    rate: float = 20.0,
    progress: Callable[[str], None] | None = None,
) -> FleetRun:
    """Run every service in its own process, send `rate` requests/s to the frontend for
    `seconds`, then stop them (each flushes its spans) and merge their truth into `truth_path`."""
    from confluent_kafka import Producer

    ctx = multiprocessing.get_context("spawn")
    ports = _free_ports(ROLES)
    # librdkafka's mock cluster lives in this client for the whole run; services reach it on loopback
    cluster = Producer({"test.mock.num.brokers": 1, "log_level": 3})
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in cluster.list_topics(timeout=10).brokers.values())
    for topic in KAFKA_CONSUMERS.values():  # the mock cluster creates a topic on its first produce only
        cluster.produce(topic, TOPIC_CREATED)
    cluster.flush(10)
    ready, stop = ctx.Queue(), ctx.Event()
    with tempfile.TemporaryDirectory(prefix="ctxaudit-fleet-") as truth_dir:
        procs = [
            ctx.Process(
                target=run_service,
                args=(role, ports, bootstrap, otlp_endpoint, truth_dir, ready, stop),
                name=f"fleet-{role}",
                daemon=True,
            )
            for role in ROLES
        ]
        for p in procs:
            p.start()
        try:
            started = set()
            while len(started) < len(ROLES):
                try:
                    started.add(ready.get(timeout=60))
                except queue.Empty:
                    raise RuntimeError(
                        f"fleet services did not start: {sorted(set(ROLES) - started)}"
                    ) from None
            sent, failed = _drive(ports["frontend"], seconds, rate, progress)
        finally:
            stop.set()
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
        records = 0
        with open(truth_path, "w", encoding="utf-8") as out:
            for role in ROLES:
                path = os.path.join(truth_dir, f"{role}.jsonl")
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        for line in f:
                            out.write(line)
                            records += 1
    return FleetRun(sent, failed, records)


def _drive(port: int, seconds: float, rate: float, progress) -> tuple[int, int]:
    """The load driver: an uninstrumented client, so each request is a legitimate root."""
    sent = failed = 0
    start = last = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/checkout", timeout=30).read()
        except OSError:
            failed += 1
        sent += 1
        if progress and time.monotonic() - last >= 5:
            last = time.monotonic()
            progress(f"fleet: {sent} requests in {last - start:.0f}s of {seconds:.0f}s ({failed} failed)")
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    return sent, failed
