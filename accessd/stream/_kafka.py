"""The Kafka broker source: every partition of each followed topic, no consumer group, batched reads.

All aiokafka work is in :mod:`accessd.aio`; each step here crosses the trio-asyncio boundary once
(one ``getmany`` batch per ``next_batch``, one crossing per follow, replay or publish). This side keeps the
authoritative position of every followed partition (the next offset to deliver) and re-applies it to the
consumer whenever the assignment changes or a poll was interrupted, so nothing is skipped or repeated.

Interface decisions (beyond :class:`~accessd.stream._source.Source`):

* Unknown topics: ``follow`` never creates a topic (the metadata request says
  ``allow_auto_topic_creation=false``; Tansu and Kafka would otherwise create it on a subscription). The
  channel is followed with no partitions and the position ``{0: 0}``; the metadata refresh picks the topic
  up once it appears and reads its partitions from the beginning (a partition absent from a position reads
  from offset 0, so the cursor stays truthful). Our own ``publish`` to such a topic triggers a refresh now.
* New partitions of a followed topic are found by the periodic refresh (``metadata_refresh_s``) and read
  from their beginning.
* Lost data: ``next_batch`` may return :class:`Gap` items in-band, before the records that follow them, when
  a followed partition's position is no longer held (retention truncated it, or the broker lost its log and
  restarted its offsets): reading resumes at the oldest offset held and ``Gap.dropped`` counts the records
  we know were skipped (0 is possible after a reset: the offsets still moved back). The hub sets the
  channel's position for that partition to ``Gap.offset`` and sends a ``gap`` frame when ``dropped > 0``.
* Outage: ``next_batch`` never raises for broker faults; it waits. The refresh loop doubles as the health
  check: it reports ``kafka: down`` when it fails, ``ok`` after, retrying with backoff. On
  recovery positions are checked against what the broker holds, then reading resumes from them.

Backpressure: ``next_batch`` is pulled; at most ``max_batch_records`` records are fetched per crossing and
aiokafka's prefetch is bounded by its fetch sizes, so a slow hub slows reading, never memory.
Cancellation: cancelling ``next_batch`` mid-poll is safe (the consumer is re-seeked before the next poll);
``run`` closes the link on the way out.
Errors: ``follow``, ``replay`` and ``publish`` raise BackendUnavailable("kafka") when the broker cannot be
reached in time (never a bare ``trio.TooSlowError``); the caller answers that one request with an error, the
source carries on. ``publish`` answers from the produce acknowledgement: once acknowledged it does not fail.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn

import trio

from ..aio import TP, KafkaLink, RawRecord, run_aio
from ..errors import BackendUnavailable
from ..primitives import Backoff, DependencyReporter, DependencyState, Retries
from ..settings import StreamSettings
from ._source import Gap, Position, Record, Replay

log = logging.getLogger("accessd.stream")

BACKEND = "kafka"
RECONNECT = Backoff(initial_s=0.1, max_s=5.0, jitter=0.5, stable_after_s=None)
UNKNOWN_TOPIC_POSITION: Position = {0: 0}


def _record(raw: RawRecord) -> Record:
    topic, partition, offset, key, value, ts_ms, headers = raw
    return Record(
        topic,
        partition,
        offset,
        None if key is None else key.decode("utf-8", errors="replace"),
        value,
        ts_ms,
        headers,
    )


class KafkaSource:
    """Kafka (aiokafka) as a :class:`~accessd.stream._source.Source`, and a supervised component."""

    name = "kafka"
    health_dependency = "kafka"  # reports its own state to /health

    def __init__(
        self,
        bootstrap: Sequence[str],
        settings: StreamSettings,
        report: DependencyReporter,
    ) -> None:
        self._bootstrap = tuple(bootstrap)
        self._report = report
        self._refresh_s = settings.kafka_metadata_refresh_s
        self._fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
        self._max_batch = settings.kafka_max_batch_records
        self._timeout_s = settings.kafka_request_timeout_s
        self._replay_timeout_s = settings.kafka_replay_timeout_s
        self._replay_max = settings.kafka_replay_max_records
        self._link: KafkaLink | None = None
        self._up: bool | None = None  # unknown until the first connection attempt
        self._channels: dict[str, set[int]] = {}  # followed channel -> its known partitions
        self._positions: dict[TP, int] = {}  # next offset to deliver, per followed partition
        self._seen_end: dict[TP, int] = {}  # highest end offset seen, to size a loss when a log is reset
        self._gaps: list[Gap] = []
        self._dirty = True  # the consumer's assignment/positions must be re-applied before the next poll
        self._consumer_lock = trio.Lock()  # one user of the live consumer at a time
        self._lookup_lock = trio.Lock()  # one user of the lookup consumer (replay, publish ends)
        self._poll_scope: trio.CancelScope | None = None
        self._wakeup = trio.Event()  # next_batch: something to read may have changed
        self._refresh_now = trio.Event()

    # --- the component ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Connect (one try), report ready, then keep the connection, metadata and health current.

        Ready even when the first try fails: the source reports ``kafka: down`` and keeps retrying, like
        every backend (a broker outage degrades the process, it does not take pods out of rotation).
        """
        try:
            await self._connect()
            task_status.started()
            await self._maintain()
        finally:
            self._set_up(False)
            link, self._link = self._link, None
            if link is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(self._timeout_s):
                    await run_aio(BACKEND, link.close)

    async def _connect(self) -> bool:
        def make() -> KafkaLink:  # aiokafka objects are created inside the asyncio loop
            return KafkaLink(
                self._bootstrap,
                request_timeout_ms=int(self._timeout_s * 1000),
                fetch_max_wait_ms=self._fetch_max_wait_ms,
                max_batch_records=self._max_batch,
            )

        async def open_link() -> KafkaLink:
            link = make()
            await link.open()
            return link

        with trio.move_on_after(self._timeout_s * 2):
            try:
                self._link = await run_aio(BACKEND, open_link)
            except BackendUnavailable as exc:
                if self._up is not False:  # one line per outage, not one per retry
                    log.warning("kafka: cannot connect to %s: %s", ",".join(self._bootstrap), exc)
        if self._link is None:
            self._set_up(False)
            return False
        self._set_up(True)
        return True

    async def _maintain(self) -> NoReturn:
        retries = Retries(RECONNECT)
        while True:
            if self._up:
                with trio.move_on_after(self._refresh_s):
                    await self._refresh_now.wait()
            else:
                await retries.wait()
            self._refresh_now = trio.Event()
            ok = await self._connect() if self._link is None else await self._refresh()
            if ok:
                retries.succeed()

    async def _refresh(self) -> bool:
        """Metadata of followed topics (new partitions), offsets held (lost data), and health."""
        link = self._link
        assert link is not None
        was_up = self._up
        try:
            with trio.fail_after(self._timeout_s * 2):
                channels = list(self._channels)
                found = await run_aio(BACKEND, link.partitions, channels or ["__accessd_health__"])
                # Only partitions the broker still lists: asking offsets of a deleted topic would hang.
                before = {tp: o for tp, o in self._positions.items() if tp[1] in (found.get(tp[0]) or ())}
                begin, end = await run_aio(BACKEND, link.bounds, list(before)) if before else ({}, {})
        except (BackendUnavailable, trio.TooSlowError) as exc:
            if was_up:
                log.warning("kafka: broker unreachable, stream paused: %s", exc)
            self._set_up(False)
            return False
        async with self._consumer():
            for channel in channels:
                partitions = found.get(channel)
                if channel not in self._channels or not partitions:
                    continue
                for partition in set(partitions) - self._channels[channel]:
                    log.info("kafka: %s partition %d appeared, reading it from its start", channel, partition)
                    self._channels[channel].add(partition)
                    self._positions[(channel, partition)] = 0
                    self._dirty = True
            gaps = reconcile(self._positions, self._seen_end, before, begin, end)
            if gaps:
                self._gaps.extend(gaps)
                self._dirty = True
                self._wakeup.set()
        if not was_up:
            log.info("kafka: broker reachable again, stream resumes")
            self._dirty = True
        self._set_up(True)
        return True

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._report(DependencyState.OK if up else DependencyState.DOWN)
        self._up = up
        self._wakeup.set()

    @asynccontextmanager
    async def lookup(self) -> AsyncIterator[None]:
        """Exclusive use of the lookup consumer (replays, and the partition ends a publish reads first)."""
        async with self._lookup_lock:
            yield

    @asynccontextmanager
    async def _consumer(self) -> AsyncIterator[None]:
        """Exclusive use of the live consumer: interrupts a pending poll instead of waiting it out."""
        if self._poll_scope is not None:
            self._poll_scope.cancel()
        async with self._consumer_lock:
            yield
        self._wakeup.set()

    def _require_link(self) -> KafkaLink:
        if self._link is None:
            raise BackendUnavailable(BACKEND, "not connected")
        return self._link

    # --- Source ---

    async def follow(self, channel: str) -> Position:
        if channel in self._channels:
            return self._position(channel)
        link = self._require_link()
        try:
            with trio.fail_after(self._timeout_s * 2):
                return await self._follow(link, channel)
        except trio.TooSlowError as exc:
            problem = f"following {channel} took over {self._timeout_s * 2:g} s"
            raise BackendUnavailable(BACKEND, problem) from exc

    async def _follow(self, link: KafkaLink, channel: str) -> Position:
        found = (await run_aio(BACKEND, link.partitions, [channel]))[channel]
        async with self._consumer():
            if channel in self._channels:  # followed meanwhile
                return self._position(channel)
            if not found:
                log.info("kafka: %s does not exist yet; following it once it appears", channel)
                self._channels[channel] = set()
                return dict(UNKNOWN_TOPIC_POSITION)
            # Interrupted half-way, the live assignment may hold the new partitions: re-apply ours then.
            self._dirty = True
            ends = await run_aio(BACKEND, link.follow, dict(self._positions), channel, found)
            self._channels[channel] = set(ends)
            for partition, offset in ends.items():
                self._positions[(channel, partition)] = offset
                self._seen_end[(channel, partition)] = offset
            self._dirty = False
        return ends

    def _position(self, channel: str) -> Position:
        partitions = self._channels[channel]
        if not partitions:
            return dict(UNKNOWN_TOPIC_POSITION)
        return {p: self._positions[(channel, p)] for p in partitions}

    async def unfollow(self, channel: str) -> None:
        if channel not in self._channels:
            return
        async with self._consumer():
            for partition in self._channels.pop(channel, ()):
                self._positions.pop((channel, partition), None)
                self._seen_end.pop((channel, partition), None)
            self._gaps = [gap for gap in self._gaps if gap.channel != channel]
            self._dirty = True

    async def next_batch(self) -> list[Record | Gap]:
        """Records of followed channels in per-partition order, Gap markers before records after a loss.

        Waits (without spinning) while nothing is followed or the broker is down.
        """
        while True:
            if self._gaps:
                gaps, self._gaps = self._gaps, []
                return list(gaps)
            link = self._link
            if link is None or not self._up or not self._positions:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            raw: list[RawRecord] = []
            out_of_range: dict[TP, int] = {}
            async with self._consumer_lock:
                if not self._up or not self._positions:
                    continue
                completed = failed = False
                try:
                    with trio.CancelScope() as self._poll_scope:
                        if self._dirty:
                            await run_aio(BACKEND, link.assign, dict(self._positions))
                            self._dirty = False
                        raw, out_of_range = await run_aio(BACKEND, link.poll, self._max_batch)
                        completed = True
                except BackendUnavailable as exc:
                    log.warning("kafka: fetch failed: %s", exc)
                    failed = True
                    self._refresh_now.set()
                finally:
                    self._poll_scope = None
                    if not completed:  # records may have left aiokafka without reaching us
                        self._dirty = True
                batch = self._accept(raw)
            if out_of_range:
                log.warning("kafka: positions out of range: %s", out_of_range)
                self._refresh_now.set()
            if batch:
                return batch
            if failed:
                await trio.sleep(self._fetch_max_wait_ms / 1000)  # a failing poll does not spin

    def _accept(self, raw: list[RawRecord]) -> list[Record | Gap]:
        batch: list[Record | Gap] = []
        positions = self._positions
        for item in raw:
            tp = (item[0], item[1])
            expected = positions.get(tp)
            if expected is None or item[2] < expected:  # unfollowed meanwhile, or already delivered
                continue
            positions[tp] = item[2] + 1
            batch.append(_record(item))
        return batch

    async def replay(self, channel: str, since: Position, until: Position) -> Replay:
        link = self._require_link()
        async with self.lookup():
            try:
                with trio.fail_after(self._replay_timeout_s):
                    raw, dropped = await run_aio(
                        BACKEND, link.replay, channel, since, until, self._replay_max
                    )
            except trio.TooSlowError as exc:
                problem = f"replay of {channel} took over {self._replay_timeout_s:g} s"
                raise BackendUnavailable(BACKEND, problem) from exc
        return Replay([_record(item) for item in raw], dropped)

    async def publish(
        self, channel: str, key: str | None, value: bytes, headers: tuple[tuple[str, bytes], ...] = ()
    ) -> Position:
        """Produce one record; its cursor is built from the ack, so an acknowledged record is never reported
        as failed (a retry would duplicate it).

        The ends of the channel's partitions are read *before* producing (a failure there is a clean
        BackendUnavailable, nothing published); the cursor is those ends with the acknowledged partition at
        ``offset + 1``. Another partition pinned at its end from just before the send may hold records
        published concurrently: a resume delivers them (none skipped). A partition unknown before the send
        (a topic created by it) is pinned at 0.
        """
        link = self._require_link()
        try:
            with trio.fail_after(self._timeout_s * 2):
                found = (await run_aio(BACKEND, link.partitions, [channel]))[channel]
                before: dict[int, int] = {}
                if found:  # the end offsets of an unknown topic would wait for it forever
                    async with self.lookup():
                        before = await run_aio(BACKEND, link.ends, channel, found)
        except trio.TooSlowError as exc:
            problem = f"publish to {channel}: partition ends not read in time; nothing was published"
            raise BackendUnavailable(BACKEND, problem) from exc
        try:
            with trio.fail_after(self._timeout_s * 2):
                encoded = None if key is None else key.encode()
                sent = await run_aio(BACKEND, link.send, channel, encoded, value, headers)
        except trio.TooSlowError as exc:
            raise BackendUnavailable(BACKEND, f"publish to {channel} not acknowledged in time") from exc
        partition, offset, partitions = sent
        position = {p: before.get(p, 0) for p in {*partitions, *before}}
        position[partition] = offset + 1
        for p, end in position.items():
            if (channel, p) in self._positions:
                self._seen_end[(channel, p)] = max(self._seen_end.get((channel, p), 0), end)
        if channel in self._channels and not self._channels[channel]:
            self._refresh_now.set()  # a followed topic that did not exist does now
        return position


def reconcile(
    positions: dict[TP, int],
    seen_end: dict[TP, int],
    before: dict[TP, int],
    begin: dict[TP, int],
    end: dict[TP, int],
) -> list[Gap]:
    """Move ``positions`` the broker no longer holds to its oldest offset; a Gap for each loss.

    ``before``: the positions when the offsets were read; only partitions that did not move since are judged
    (one that moved was just read from, so the broker holds it). ``seen_end``: the highest end offset seen
    per partition, to size a loss when a log is reset; updated here.
    """
    gaps = []
    for tp, position in list(positions.items()):
        if tp not in begin or tp not in end or before.get(tp) != position:
            continue
        seen_end[tp] = max(seen_end.get(tp, 0), end[tp])
        if position < begin[tp]:  # retention (or a truncation) took records we had not delivered
            lost, resume = begin[tp] - position, begin[tp]
        elif position > end[tp]:  # the log was reset (a broker that lost its data): offsets restarted
            lost, resume = max(0, seen_end[tp] - position), begin[tp]
            seen_end[tp] = end[tp]
        else:
            continue
        log.warning("kafka: %s[%d] lost %d records, resuming at offset %d", *tp, lost, resume)
        positions[tp] = resume
        # Also with lost == 0: the offsets moved back, and a reader deduplicating by offset must know.
        gaps.append(Gap(tp[0], tp[1], lost, resume))
    return gaps
