"""Redis broker: reliable queues with leases, priorities and delays; a plain RPUSH to publish, Lua for the rest.

Connection string
=================

.. code-block::

    redis://[[user]:password@]host[:port][/db][?socket_timeout=10&...]
    rediss://[[user]:password@]host[:port][/db][?ssl_cert_reqs=required&ssl_ca_certs=/path]
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?...]

The last finds the primary through Sentinel (``redis_wire.connection_pool``: the hosts are
the Sentinels, port 26379 by default; a command that reaches a demoted primary fails as a
lost connection, and callers reconnect to the new one).
Query parameters are redis-py's (``ConnectionPool.from_url``), except ``cluster=true``.
``broker_options`` may add ``cluster`` (default False: see Redis Cluster below; the query
parameter does the same), ``key_prefix`` (default ``"taskframe"``), ``socket_timeout`` (s, default 10),
``socket_connect_timeout`` (s, default 5), ``publish_retry_s`` (default 10: how long
``publish`` retries a lost connection before raising), ``max_connections``,
``health_check_interval`` and ``client_name``. Needs Redis >= 6.2 (``LPOP`` with a count,
fractional ``BZPOPMIN`` timeouts) and redis-py >= 5.

Features
========
* Priority: yes, 0-9, 9 most urgent (``supports_priority = True``); FIFO within a priority.
* Delays: a sorted set scored by due time, held in Redis (they survive worker restarts); any
  consumer moves due messages to the ready set, so no scheduler process is needed.
* Leases: a received message sits in an in-flight sorted set scored by its lease expiry;
  ``renew`` pushes the expiry out; an expired lease makes the message ready again.
* Dead letters: a message delivered ``max_deliveries`` times without an ack, or nacked with
  ``requeue=False``, moves to the queue's dead-letter list; list, requeue or purge it there.
* Blocking receive: a consumer with nothing to do blocks on ``BZPOPMIN`` of the queues'
  wake-up sets, woken by a publish or at the next due delay or lease expiry: no polling.
  The receive script goes out in the same write, behind the ``BZPOPMIN``: Redis runs it the
  moment the block ends, so a wake-up costs no extra round trip (not on a cluster, where the
  tokens and the queues may be on different nodes).
* Batches: one ``receive`` leases up to ``max_messages`` in one round trip; ``publish_many``
  sends every message in one write (an ``RPUSH`` per queue and priority); ``ack_many``
  acks a batch in one round trip.
* Time: every timestamp (delays, leases, dead letters) is Redis's own ``TIME``, so clients
  with skewed clocks agree.

Delivery guarantee
==================
At least once. A publish without delay is one ``RPUSH`` (then a wake-up ``ZADD``); every other
operation is one Lua script. So a message is always in exactly one of fresh, ready, delayed,
in-flight or dead, and its move from fresh or ready to in-flight (the lease) is atomic:
two consumers never lease the same copy, and a consumer that dies (SIGKILL) leaves its
messages in flight, where the next receive by anyone finds the lease expired and makes them
ready again after ``visibility_timeout``. Each receive issues a fresh lease token; ack, nack
and renew act only while the delivery still holds its lease, so a late ack after the message
was received again elsewhere is a no-op (the message may run twice; tasks must be
idempotent). A late ack whose message nobody received since still deletes it.

Durability is Redis's: with the default RDB snapshots, a Redis crash loses the writes since
the last snapshot. For a broker, run Redis with ``appendonly yes`` (``appendfsync everysec``
loses at most a second; ``always`` loses nothing that was acknowledged).

Connection loss: ``receive``, ``ack``, ``nack`` and ``renew`` raise
:class:`~taskframe.exceptions.BrokerConnectionError` at once (the worker reconnects with
backoff); ``publish`` retries for ``publish_retry_s`` with backoff, then raises it. A publish
retried after a lost reply re-sends the same message id: if both copies landed, the receive
that meets the second finds the id's body already stored (``HSETNX``) and drops it, so a
message still queued or running is not delivered twice.

Layout, and why
===============
Per queue ``q``, every key carries the hash tag ``{q}``, so all of a queue's keys live in one
cluster slot and each script's keys are declared (``KEYS``), as Redis Cluster requires::

    <prefix>:{q}:new0..new9 LIST  fresh messages, "<id><body>", one list per priority, FIFO:
                                  what a publish without delay appends (RPUSH)
    <prefix>:{q}:ready      ZSET  ids of messages that came back (expired lease, due delay, nack,
                                  requeued dead letter), scored (9 - priority) * 2**44 + seq
    <prefix>:{q}:delayed    ZSET  message id, scored by due time (ms, Redis clock)
    <prefix>:{q}:inflight   ZSET  message id, scored by lease expiry (ms, Redis clock)
    <prefix>:{q}:body       HASH  message id -> Envelope.to_bytes(), from the first receive (from
                                  the publish for a delayed message) until the ack
    <prefix>:{q}:count      HASH  message id -> deliveries so far
    <prefix>:{q}:lease      HASH  message id -> token of the receive that leased it last
    <prefix>:{q}:dead       LIST  message ids, in the order they died
    <prefix>:{q}:dead_info  HASH  message id -> JSON [deliveries, dead_at (UNIX s), reason]
    <prefix>:{q}:seq        STRING the FIFO counter (deleted whenever the ready set empties)
    <prefix>:{q}:wake       ZSET  at most one member, "something changed, look again": ZADD is
                                  idempotent, so a publish needs no script to keep it bounded

A message id is its priority digit followed by 32 hex digits, so the priority travels with
the id through the delayed and in-flight sets without another lookup.

Why Lua and sorted sets rather than the alternatives:

* ``LMOVE``/``BLMOVE`` into a per-consumer list is atomic, but only one message per call, a
  lease expiry needs a second structure anyway, and a dead consumer's list must be found and
  swept by someone; and ``BLMOVE`` cannot choose the most urgent of several priority lists.
* Streams with consumer groups (``XREADGROUP`` + ``XAUTOCLAIM``) give leases and delivery
  counts, but no priorities (a stream per priority means a read per priority) and no delays
  (a sorted set and a mover are needed anyway), and a delivery count cannot be reset when a
  dead letter is requeued.
* One script per receive does "promote due delays, reclaim expired leases, lease up to N,
  dead-letter over-delivered" atomically in one round trip, and a wake-up set lets an idle
  consumer block without touching the lease logic.
* Publishing is the hot path, and a script costs Redis 13-16 us where an ``RPUSH`` costs 1-2:
  so a fresh message goes into a plain list carrying its body, and the receive script, which
  runs anyway, stores the body and leases it. The receive takes, per priority, the messages
  that came back first, then the fresh ones.

A consumer of several queues runs one script over all of them (priority first, then queue
order); on a cluster, when their keys share a slot (see Redis Cluster).

Redis Cluster
=============
With ``broker_options={"cluster": True}`` (or ``?cluster=true``) the URL names any node, and
redis-py's ``RedisCluster`` keeps the slot map and a connection pool per node (per process:
a forked child builds its own). Every command still goes out hand-packed, on a connection of
the node that owns the queue's slot: a queue's keys share its hash tag, so each script and
each publish touches one slot. Several queues in one call (``publish_many``, ``ack_many``,
``renew``) are grouped per node, one pipelined round trip per node. A reply that says the
command did not run there (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) re-reads the slot map and sends
again (``CLUSTER_ATTEMPTS``); a lost connection also re-reads it before the next command,
so a failover to a replica is followed.

What holds as on one server: every guarantee above, for a consumer of one queue, or of queues
whose keys share a slot (a common hash tag: ``{jobs}.high`` and ``{jobs}.low``), which is read
by the same one script. What differs for a consumer of queues on several slots, since no
script or ``BZPOPMIN`` can span slots:

* A receive is a peek script per queue (promote what is due; count what is ready per
  priority), then a receive script per queue that leases that queue's share of the most
  urgent messages, in one round trip per node each. The deliveries come back most urgent
  first, then in queue order, as on one server; but the two steps are not one atomic step:
  a message another consumer takes in between is not replaced in this batch, and a more
  urgent one published in between waits for the next receive.
* An idle wait blocks on the first queue's wake-up set for at most ``CLUSTER_POLL_S``
  (0.1 s), then looks at every queue again: a message for another queue waits up to that
  long, and an idle consumer makes a peek round trip per node ten times a second.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, NoScriptError, RedisClusterException, TryAgainError
from redis.retry import Retry

from taskframe.broker import (
    DEFAULT_PRIORITY,
    Buried,
    BuriedLog,
    DeadLetter,
    Delivery,
    Envelope,
    OutgoingMessage,
    QueueStats,
    check_priority,
    check_queues,
    check_receive,
    warn_lost_leases,
)
from taskframe.exceptions import BrokerConnectionError, BrokerError, ConfigurationError, MessageError
from taskframe.settings import mask_url

from .redis_wire import (
    GET_CONNECTION_ARGS,
    DirectLane,
    RawConnection,
    connection_pool,
    exchange,
    is_sentinel_url,
    resp,
)

if TYPE_CHECKING:
    from taskframe.broker import Broker, Consumer
    from taskframe.settings import Settings

log = logging.getLogger(__name__)

#: Key prefix of every key this broker writes, unless ``broker_options["key_prefix"]`` says otherwise.
DEFAULT_KEY_PREFIX = "taskframe"
#: Seconds a socket read or write may take before the connection counts as lost.
DEFAULT_SOCKET_TIMEOUT_S = 10.0
#: Seconds to establish a connection before it counts as refused.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Seconds ``publish`` keeps retrying a lost connection before it raises.
DEFAULT_PUBLISH_RETRY_S = 10.0
#: First and longest pause, in seconds, between two publish attempts.
RETRY_MIN_S, RETRY_MAX_S = 0.05, 1.0
#: Longest single BZPOPMIN, in seconds: well under the socket timeout, so a block never looks
#: like a dead connection; a longer receive blocks several times.
MAX_BLOCK_S = 5.0
#: Due delayed messages and expired leases moved per queue and receive: bounds the time one
#: script blocks Redis after a long outage; the rest moves on the next receives.
PROMOTE_BATCH = 1000
#: On a Redis Cluster, the longest a consumer of queues on several slots blocks on its first
#: queue's wake-up set before it looks at all its queues again (BZPOPMIN cannot span slots).
CLUSTER_POLL_S = 0.1
#: Attempts of a command that a Redis Cluster redirected (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: it
#: did not run), re-reading the slot map in between.
CLUSTER_ATTEMPTS = 3

_OPTIONS = frozenset(
    {
        "cluster",
        "key_prefix",
        "socket_timeout",
        "socket_connect_timeout",
        "publish_retry_s",
        "max_connections",
        "health_check_interval",
        "client_name",
    }
)

#: The lists of fresh messages, one per priority (``new0`` .. ``new9``): a publish appends
#: "<id><body>" to one of them without a script.
_NEW = tuple(f"new{priority}" for priority in range(10))
#: Suffixes of a queue's keys (see the module docstring).
_SUFFIXES = ("ready", "delayed", "inflight", "body", "count", "lease", "dead", "dead_info", "seq", "wake", *_NEW)

#: The keys each script gets, per queue, in this order: only those it uses, since packing
#: arguments is a good part of a publish's client-side cost.
_SCRIPT_KEYS: dict[str, tuple[str, ...]] = {
    "publish": ("ready", "delayed", "body", "seq", "wake"),
    "receive": _SUFFIXES,
    "peek": _SUFFIXES,
    "ack": ("ready", "inflight", "body", "count", "lease"),
    "nack": _SUFFIXES,
    "renew": ("ready", "inflight", "lease"),
    "stats": ("ready", "delayed", "inflight", "dead", *_NEW),
    "purge": ("ready", "delayed", "inflight", "body", "count", "lease", "seq", *_NEW),
    "dead_list": ("body", "dead", "dead_info"),
    "requeue_dead": ("ready", "body", "count", "dead", "dead_info", "seq", "wake"),
    "purge_dead": ("body", "dead", "dead_info"),
}

# Shared by the scripts: the priority band and helpers. Each script is preceded by a header
# that sets K (keys per queue) and each key's index (nil where the script does not get it).
_LUA_PRELUDE = """
local BAND = 17592186044416  -- 2^44: one band per priority, FIFO sequence inside it
local ID_LENGTH = 33  -- a message id: its priority digit, then 32 hex digits
local function key(q, k) return KEYS[(q - 1) * K + k] end
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
-- Lua prints numbers with 14 digits; scores need every digit.
local function ms(x) return string.format('%.3f', x) end
local function make_ready(q, id)
  local seq = redis.call('INCR', key(q, SEQ))
  local priority = tonumber(string.sub(id, 1, 1))
  redis.call('ZADD', key(q, READY), string.format('%.0f', (9 - priority) * BAND + seq), id)
end
-- A token only wakes a consumer blocked at this moment (others look at the queue before they
-- block), so an unused one may expire: an idle queue keeps no keys.
local function notify(q)
  redis.call('ZADD', key(q, WAKE), 0, '1')
  redis.call('PEXPIRE', key(q, WAKE), 60000)
end
local function bury(q, id, deliveries, reason, now)
  redis.call('ZREM', key(q, READY), id)
  redis.call('ZREM', key(q, DELAYED), id)
  redis.call('ZREM', key(q, INFLIGHT), id)
  redis.call('HDEL', key(q, LEASE), id)
  redis.call('HDEL', key(q, COUNT), id)
  redis.call('HSET', key(q, DEAD_INFO), id, cjson.encode({deliveries, now / 1000, reason}))
  redis.call('RPUSH', key(q, DEAD), id)
end
local function holds_lease(id, token) return redis.call('HGET', key(1, LEASE), id) == token end
-- Due delayed messages and expired leases become ready (at most batch of each).
local function promote(q, now, batch)
  for _, source in ipairs({DELAYED, INFLIGHT}) do
    local due = redis.call('ZRANGEBYSCORE', key(q, source), '-inf', ms(now), 'LIMIT', 0, batch)
    for _, id in ipairs(due) do
      redis.call('ZREM', key(q, source), id)
      make_ready(q, id)  -- an expired lease keeps its token: a late ack may still delete it
    end
  end
end
-- Milliseconds until queue q's next delay or lease falls due, or wait_ms if that is sooner (-1: never).
local function next_due(q, now, wait_ms)
  for _, source in ipairs({DELAYED, INFLIGHT}) do
    local first = redis.call('ZRANGE', key(q, source), 0, 0, 'WITHSCORES')
    if first[2] then
      local due_in = math.max(0, math.ceil(tonumber(first[2]) - now))
      if wait_ms < 0 or due_in < wait_ms then wait_ms = due_in end
    end
  end
  return wait_ms
end
"""

# A delayed publish (one without delay is an RPUSH, see RedisBroker.publish).
# KEYS: one queue's keys. ARGV: id, body, delay_ms.
_PUBLISH = """
redis.call('HSET', key(1, BODY), ARGV[1], ARGV[2])
local delay_ms = tonumber(ARGV[3])
if delay_ms > 0 then
  redis.call('ZADD', key(1, DELAYED), ms(clock_ms() + delay_ms), ARGV[1])
else
  make_ready(1, ARGV[1])
end
notify(1)
return 1
"""

# KEYS: the keys of each queue, in the consumer's order.
# ARGV: max_messages, lease_ms, max_deliveries, token, promote_batch[, floor]: priorities below
# floor (default 0) are left alone (a consumer of queues on several cluster slots, see _PEEK).
# Returns {wait_ms, buried {q, id, deliveries, ...}, leased {q, id, deliveries, body, ...}};
# wait_ms is how long until a delay or lease falls due when nothing was leased (-1: never).
_RECEIVE = """
local want, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_deliveries, token, batch = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local floor = tonumber(ARGV[6] or '0')
local nq = #KEYS / K
local now = clock_ms()
for q = 1, nq do promote(q, now, batch) end
local leased, buried, taken = {}, {}, 0
local lease_until = ms(now + lease_ms)
-- count: deliveries so far. Buries instead when that reached max_deliveries.
local function take(q, id, body, count)
  if count >= max_deliveries then
    bury(q, id, count, 'delivered ' .. count .. ' times without an ack (max_deliveries=' ..
      max_deliveries .. '): the task probably crashed its worker', now)
    buried[#buried + 1] = q; buried[#buried + 1] = id; buried[#buried + 1] = count
    return
  end
  count = count + 1
  redis.call('HSET', key(q, COUNT), id, count)
  redis.call('HSET', key(q, LEASE), id, token)
  redis.call('ZADD', key(q, INFLIGHT), lease_until, id)
  leased[#leased + 1] = q; leased[#leased + 1] = id; leased[#leased + 1] = count
  leased[#leased + 1] = body
  taken = taken + 1
end
local requeued = {}
for q = 1, nq do requeued[q] = redis.call('ZCARD', key(q, READY)) > 0 end
-- Most urgent priority first, then queue order; within one queue and priority, the messages
-- that came back (ready set) before the fresh ones (new lists), each FIFO.
for p = 9, floor, -1 do
  for q = 1, nq do
    while requeued[q] and taken < want do
      local low = (9 - p) * BAND
      local ids = redis.call('ZRANGEBYSCORE', key(q, READY), string.format('%.0f', low),
        '(' .. string.format('%.0f', low + BAND), 'LIMIT', 0, want - taken)
      if #ids == 0 then break end
      for _, id in ipairs(ids) do
        redis.call('ZREM', key(q, READY), id)
        local body = redis.call('HGET', key(q, BODY), id)
        if body then
          take(q, id, body, tonumber(redis.call('HGET', key(q, COUNT), id) or '0'))
        else  -- acked or purged meanwhile: nothing to deliver
          redis.call('HDEL', key(q, COUNT), id)
          redis.call('HDEL', key(q, LEASE), id)
        end
      end
    end
    while taken < want do
      local fresh = redis.call('LPOP', key(q, NEW0 + p), want - taken)
      if not fresh then break end
      for _, payload in ipairs(fresh) do
        local id, body = string.sub(payload, 1, ID_LENGTH), string.sub(payload, ID_LENGTH + 1)
        -- A body already there means a publish retried after a lost reply: the first copy
        -- is queued or leased already, so this one is dropped.
        if redis.call('HSETNX', key(q, BODY), id, body) == 1 then take(q, id, body, 0) end
      end
    end
  end
  if taken >= want then break end
end
local wait_ms = -1
if taken >= want or floor > 0 then
  for q = 1, nq do notify(q) end  -- more may be left: a publish wakes only one consumer
else
  for q = 1, nq do
    -- Everything ready was taken: a token left now would only wake a consumer for nothing.
    redis.call('DEL', key(q, WAKE))
    if redis.call('ZCARD', key(q, READY)) == 0 then
      redis.call('DEL', key(q, SEQ))  -- FIFO order only matters among ready messages
    end
  end
end
if taken == 0 then
  for q = 1, nq do wait_ms = next_due(q, now, wait_ms) end
end
return {wait_ms, buried, leased}
"""

# The first half of a receive on a Redis Cluster by a consumer of queues on several slots, which
# no one script can span: what is ready in each queue, so that the receives that follow take
# the most urgent messages first across the queues.
# KEYS: one queue's keys. ARGV: promote_batch. Promotes what is due, as a receive does.
# Returns {wait_ms, ready9, ready8, ..., ready0}; wait_ms as a receive's when nothing is ready.
_PEEK = """
local now = clock_ms()
promote(1, now, tonumber(ARGV[1]))
local out, total = {-1}, 0
for p = 9, 0, -1 do
  local low = (9 - p) * BAND
  local n = redis.call('ZCOUNT', key(1, READY), string.format('%.0f', low), '(' .. string.format('%.0f', low + BAND))
  n = n + redis.call('LLEN', key(1, NEW0 + p))
  out[#out + 1] = n
  total = total + n
end
if total == 0 then out[1] = next_due(1, now, -1) end
return out
"""

# KEYS: one queue's keys. ARGV: id, token pairs. Returns how many were deleted.
_ACK = """
local ids = {}
for i = 1, #ARGV, 2 do
  if holds_lease(ARGV[i], ARGV[i + 1]) then ids[#ids + 1] = ARGV[i] end
end
if #ids == 0 then return 0 end
redis.call('ZREM', key(1, INFLIGHT), unpack(ids))
redis.call('ZREM', key(1, READY), unpack(ids))  -- their leases ran out, but nobody took them since
redis.call('HDEL', key(1, BODY), unpack(ids))
redis.call('HDEL', key(1, COUNT), unpack(ids))
redis.call('HDEL', key(1, LEASE), unpack(ids))
return #ids
"""

# KEYS: one queue's keys. ARGV: id, token, requeue (1/0), delay_ms, reason, uncount (1: a release,
# whose delivery does not count; optional). Returns 1 if done.
_NACK = """
local id = ARGV[1]
if not holds_lease(id, ARGV[2]) then return 0 end
if ARGV[3] == '1' then
  if ARGV[6] == '1' and tonumber(redis.call('HGET', key(1, COUNT), id) or '0') > 0 then
    redis.call('HINCRBY', key(1, COUNT), id, -1)
  end
  redis.call('ZREM', key(1, INFLIGHT), id)
  redis.call('ZREM', key(1, READY), id)
  redis.call('HDEL', key(1, LEASE), id)
  local now, delay_ms = clock_ms(), tonumber(ARGV[4])
  if delay_ms > 0 then
    redis.call('ZADD', key(1, DELAYED), ms(now + delay_ms), id)
  else
    make_ready(1, id)
  end
  notify(1)
else
  local count = tonumber(redis.call('HGET', key(1, COUNT), id) or '0')
  bury(1, id, count, ARGV[5], clock_ms())
end
return 1
"""

# KEYS: one queue's keys. ARGV: lease_ms, then id, token pairs. Returns how many were renewed.
_RENEW = """
local until_ms, renewed = ms(clock_ms() + tonumber(ARGV[1])), 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if holds_lease(id, ARGV[i + 1]) then
    -- Also hides it again if its lease had run out and nobody has taken it since.
    redis.call('ZREM', key(1, READY), id)
    redis.call('ZADD', key(1, INFLIGHT), until_ms, id)
    renewed = renewed + 1
  end
end
return renewed
"""

# KEYS: one queue's keys. Returns {ready, delayed, reserved, dead}.
_STATS = """
local now = ms(clock_ms())
local due = redis.call('ZCOUNT', key(1, DELAYED), '-inf', now)
local expired = redis.call('ZCOUNT', key(1, INFLIGHT), '-inf', now)
local fresh = 0
for p = 0, 9 do fresh = fresh + redis.call('LLEN', key(1, NEW0 + p)) end
return {
  redis.call('ZCARD', key(1, READY)) + fresh + due + expired,
  redis.call('ZCARD', key(1, DELAYED)) - due,
  redis.call('ZCARD', key(1, INFLIGHT)) - expired,
  redis.call('LLEN', key(1, DEAD)),
}
"""

# KEYS: one queue's keys. Deletes ready, delayed and expired in-flight messages; returns how many.
_PURGE = """
local now = ms(clock_ms())
local ids = redis.call('ZRANGE', key(1, READY), 0, -1)
for _, id in ipairs(redis.call('ZRANGE', key(1, DELAYED), 0, -1)) do ids[#ids + 1] = id end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', key(1, INFLIGHT), '-inf', now)) do ids[#ids + 1] = id end
for i = 1, #ids, 1000 do
  local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
  redis.call('HDEL', key(1, BODY), unpack(chunk))
  redis.call('HDEL', key(1, COUNT), unpack(chunk))
  redis.call('HDEL', key(1, LEASE), unpack(chunk))
end
-- Fresh messages have no body in the hash yet (the list holds it): dropping the lists is enough.
local fresh = 0
for p = 0, 9 do
  fresh = fresh + redis.call('LLEN', key(1, NEW0 + p))
  redis.call('DEL', key(1, NEW0 + p))
end
redis.call('DEL', key(1, READY), key(1, DELAYED), key(1, SEQ))
redis.call('ZREMRANGEBYSCORE', key(1, INFLIGHT), '-inf', now)
return #ids + fresh
"""

# KEYS: one queue's keys. ARGV: limit. Returns {id, info, body, ...} of the oldest dead letters.
_DEAD_LIST = """
local out = {}
for _, id in ipairs(redis.call('LRANGE', key(1, DEAD), 0, tonumber(ARGV[1]) - 1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', key(1, DEAD_INFO), id) or '[0, 0, ""]'
  out[#out + 1] = redis.call('HGET', key(1, BODY), id) or ''
end
return out
"""

# KEYS: one queue's keys. Moves every dead letter back to ready with a fresh count.
_REQUEUE_DEAD = """
local ids = redis.call('LRANGE', key(1, DEAD), 0, -1)
local moved = 0
for _, id in ipairs(ids) do
  redis.call('HDEL', key(1, DEAD_INFO), id)
  if redis.call('HEXISTS', key(1, BODY), id) == 1 then
    redis.call('HDEL', key(1, COUNT), id)
    make_ready(1, id)
    moved = moved + 1
  end
end
redis.call('DEL', key(1, DEAD))
if moved > 0 then notify(1) end
return moved
"""

# KEYS: one queue's keys. Deletes every dead letter; returns how many.
_PURGE_DEAD = """
local ids = redis.call('LRANGE', key(1, DEAD), 0, -1)
for i = 1, #ids, 1000 do
  local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
  redis.call('HDEL', key(1, BODY), unpack(chunk))
  redis.call('HDEL', key(1, DEAD_INFO), unpack(chunk))
end
redis.call('DEL', key(1, DEAD))
return #ids
"""

_SCRIPTS = {
    "publish": _PUBLISH,
    "receive": _RECEIVE,
    "peek": _PEEK,
    "ack": _ACK,
    "nack": _NACK,
    "renew": _RENEW,
    "stats": _STATS,
    "purge": _PURGE,
    "dead_list": _DEAD_LIST,
    "requeue_dead": _REQUEUE_DEAD,
    "purge_dead": _PURGE_DEAD,
}

_T = TypeVar("_T")


def _script_source(name: str) -> str:
    used = _SCRIPT_KEYS[name]
    names = ", ".join(suffix.upper() for suffix in _SUFFIXES)
    indexes = ", ".join(str(used.index(suffix) + 1) if suffix in used else "nil" for suffix in _SUFFIXES)
    return f"local K = {len(used)}\nlocal {names} = {indexes}\n{_LUA_PRELUDE}{_SCRIPTS[name]}"


#: Script name -> its Lua source, with the header for its keys.
_SOURCES = {name: _script_source(name) for name in _SCRIPTS}


def _message_id(priority: int) -> str:
    return f"{check_priority(priority)}{os.urandom(16).hex()}"


def _block_timeout(timeout_s: float) -> str:
    """A BZPOPMIN timeout: Redis counts whole milliseconds, and 0 would mean forever."""
    return str(round(max(timeout_s, 0.001), 3))


def _rpush(prefix: bytes, payloads: Sequence[bytes]) -> bytes:
    """``RPUSH`` of ``payloads``, after ``prefix`` (the packed command name and key, from
    :meth:`RedisBroker._fresh_commands`, with the argument count still to add)."""
    out = [b"*%d\r\n" % (len(payloads) + 2), prefix]
    for payload in payloads:
        out += (b"$%d\r\n" % len(payload), payload, b"\r\n")
    return b"".join(out)


#: Most messages one ``RPUSH`` of ``publish_many`` carries, and most deliveries one ack script
#: gets (Lua's ``unpack`` has a limit near 8,000).
CHUNK = 1000


class _ScriptPacker:
    """Packs EVALSHA calls; the part shared by the standalone and the cluster connection."""

    shas: dict[str, str]
    _heads: dict[tuple[str, tuple[bytes, ...]], bytes]

    def _evalsha(self, call: tuple[str, Sequence[bytes], Sequence[Any]]) -> bytes:
        name, keys, args = call
        cache_key = (name, tuple(keys))
        head = self._heads.get(cache_key)
        if head is None:
            # The script and its keys, packed once: a receive of one queue has 20 keys.
            head = resp("EVALSHA", self.shas[name], len(keys), *keys).split(b"\r\n", 1)[1]
            if len(self._heads) < 10_000:  # bounded, as RedisBroker._keys
                self._heads[cache_key] = head
        out = [b"*%d\r\n" % (3 + len(keys) + len(args)), head]
        for arg in args:
            raw = arg if isinstance(arg, bytes) else str(arg).encode()
            out += (b"$%d\r\n" % len(raw), raw, b"\r\n")
        return b"".join(out)


class _Connection(_ScriptPacker):
    """This process's connection pool, client and scripts (a forked child makes its own)."""

    def __init__(self, url: str, kwargs: dict[str, Any]) -> None:
        self.pid = os.getpid()
        self.pool = connection_pool(url, **kwargs)
        self.client = redis.Redis(connection_pool=self.pool)
        self.shas = {name: Script(self.client, source).sha for name, source in _SOURCES.items()}
        self._lane = DirectLane(self.pool)  # see redis_wire: a publish is one write, no pool
        self._heads: dict[tuple[str, tuple[bytes, ...]], bytes] = {}

    def run(self, name: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """One EVALSHA; after NOSCRIPT (Redis restarted or flushed its scripts) load and repeat."""
        return self.run_many([(name, keys, args)])[0]

    def ping(self) -> None:
        self.client.ping()

    def block_then_run(
        self, wake_keys: Sequence[bytes], timeout_s: float, name: str, keys: Sequence[bytes], args: Sequence[Any]
    ) -> Any:
        """BZPOPMIN of ``wake_keys``, then one script, in one write on one connection.

        Redis runs a connection's commands in order, so the script starts the moment the block
        ends (a wake-up or its timeout) instead of after the wake-up has reached this process
        and it has asked again: an idle consumer's round trip is one hop shorter. On a pooled
        connection: the lane's kept one stays free for publishes meanwhile.
        """
        packed = resp("BZPOPMIN", *wake_keys, _block_timeout(timeout_s)) + self._evalsha((name, keys, args))
        woken, result = self._lane.send_pooled(packed, 2)
        if isinstance(woken, Exception):
            raise woken
        if isinstance(result, NoScriptError):  # Redis restarted or flushed its scripts
            return self.run(name, keys, args)
        if isinstance(result, Exception):
            raise result
        return result

    def send(self, packed: bytes, replies: int, route: bytes = b"") -> list[Any]:
        """Send packed commands in one write and read their ``replies``: one round trip
        (``route``, a key of the commands, matters only on a cluster). See
        :func:`redis_wire.exchange` for errors."""
        return self._lane.send(packed, replies)

    def run_many(self, calls: Sequence[tuple[str, Sequence[bytes], Sequence[Any]]]) -> list[Any]:
        """Several scripts in one pipelined round trip (not a transaction: each is atomic).

        EVALSHA goes out directly; only after NOSCRIPT (Redis was restarted) are the scripts
        loaded and the failed calls sent again.
        """
        results = self.send(b"".join(self._evalsha(call) for call in calls), len(calls))
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            for name in {calls[i][0] for i in missing}:
                self.client.script_load(_SOURCES[name])
            retried = self.send(b"".join(self._evalsha(calls[i]) for i in missing), len(missing))
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def close(self) -> None:
        self._lane.close()
        self.pool.disconnect()


#: A reply that says a Redis Cluster did not run the command there (the slot moved, is moving,
#: or the cluster is failing over): re-read the slot map and send it again.
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)


class _ClusterConnection(_ScriptPacker):
    """This process's Redis Cluster client: redis-py's ``RedisCluster`` keeps the slot map and a
    connection pool per node, and each command goes straight to the node of its queue's slot
    (every key of one queue shares the slot of its hash tag). Same interface as _Connection."""

    def __init__(self, url: str, kwargs: dict[str, Any]) -> None:
        self.pid = os.getpid()
        try:
            self.client = RedisCluster.from_url(url, **kwargs)
        except RedisClusterException as exc:  # not a RedisError: no node answered, or slots uncovered
            if "Cluster mode is not enabled" in str(exc):  # a mistake to report, not an outage to wait out
                msg = "this Redis is not a cluster node (cluster mode is not enabled); drop the cluster option"
                raise redis.exceptions.ResponseError(msg) from exc
            msg = f"Redis Cluster not reachable: {exc}"
            raise redis.exceptions.ConnectionError(msg) from exc
        self.shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in _SOURCES.items()}
        self._heads: dict[tuple[str, tuple[bytes, ...]], bytes] = {}
        self._stale = False  # re-read the slot map before the next command (after a failover)

    def node(self, key: bytes) -> ClusterNode:
        """The primary that holds ``key``'s slot."""
        try:
            if self._stale:
                self._stale = False
                self.client.nodes_manager.initialize()
            return cast(ClusterNode, self.client.get_node_from_key(key))  # type: ignore[no-untyped-call]
        except RedisClusterException as exc:
            self._stale = True
            msg = f"Redis Cluster slot map unavailable: {exc}"
            raise redis.exceptions.ConnectionError(msg) from exc

    def ping(self) -> None:
        try:
            self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        except redis.exceptions.RedisError:
            self._stale = True
            raise
        except RedisClusterException as exc:
            self._stale = True
            msg = f"Redis Cluster not reachable: {exc}"
            raise redis.exceptions.ConnectionError(msg) from exc

    def block(self, wake_keys: Sequence[bytes], timeout_s: float) -> None:
        """BZPOPMIN of ``wake_keys``, which must share one slot, on its node."""
        client = self.client.get_redis_connection(self.node(wake_keys[0]))
        try:
            client.bzpopmin(wake_keys, timeout=_block_timeout(timeout_s))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self._stale = True
            raise
        except _REDIRECTED:
            self._stale = True  # the slot moved: the next receive looks at the queues again

    def send(self, packed: bytes, replies: int, route: bytes = b"") -> list[Any]:
        """As _Connection.send, on the node of ``route``'s slot (every command must be for a
        key of that node). Sent again when every reply is a redirection, since then none ran."""
        pause_s = RETRY_MIN_S
        for attempt in range(1, CLUSTER_ATTEMPTS + 1):
            pool = self.client.get_redis_connection(self.node(route)).connection_pool
            conn = pool.get_connection(*GET_CONNECTION_ARGS)
            try:
                results = exchange(cast(RawConnection, conn), packed, replies)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                self._stale = True  # the node may have failed over: ask the cluster again next time
                raise
            finally:
                pool.release(conn)
            if not results or not all(isinstance(result, _REDIRECTED) for result in results):
                return results
            self._stale = True
            if attempt < CLUSTER_ATTEMPTS:
                time.sleep(pause_s)
                pause_s *= 2
        return results

    def run(self, name: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        return self.run_many([(name, keys, args)])[0]

    def run_many(self, calls: Sequence[tuple[str, Sequence[bytes], Sequence[Any]]]) -> list[Any]:
        """As _Connection.run_many: one pipelined round trip per node, nodes one after another."""
        by_node: dict[str, list[int]] = {}
        for i, (_, keys, _) in enumerate(calls):
            by_node.setdefault(self.node(keys[0]).name, []).append(i)
        results: list[Any] = [None] * len(calls)
        for indexes in by_node.values():
            route = calls[indexes[0]][1][0]
            replies = self.send(b"".join(self._evalsha(calls[i]) for i in indexes), len(indexes), route)
            missing = [i for i, reply in zip(indexes, replies, strict=True) if isinstance(reply, NoScriptError)]
            if missing:
                node_client = self.client.get_redis_connection(self.node(route))
                for name in {calls[i][0] for i in missing}:
                    node_client.script_load(_SOURCES[name])
                retried = self.send(b"".join(self._evalsha(calls[i]) for i in missing), len(missing), route)
            for i, reply in zip(indexes, replies, strict=True):
                results[i] = reply
            if missing:
                for i, reply in zip(missing, retried, strict=True):
                    results[i] = reply
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def close(self) -> None:
        # RedisCluster.close() leaves the nodes' pools connected: disconnect them here.
        for node in self.client.get_nodes():  # type: ignore[no-untyped-call]
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
        self.client.close()


#: Connections inherited through fork(): kept referenced and never closed by the child, whose
#: sockets are the parent's too (closing them could end the parent's connections).
_INHERITED: list[_Connection | _ClusterConnection] = []


class RedisBroker:
    """The ``redis://`` / ``rediss://`` broker; see the module docstring for its guarantees."""

    supports_priority: ClassVar[bool] = True

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        self.visibility_timeout_s = conf.visibility_timeout
        self.max_deliveries = conf.max_deliveries
        options = dict(conf.broker_options)
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            msg = f"unknown broker_options {unknown} for the redis broker {mask_url(url)!r}; known: {sorted(_OPTIONS)}"
            raise ConfigurationError(msg)
        self._redis_url, in_url = _split_cluster_query(url)
        cluster = options.pop("cluster", in_url)
        if not isinstance(cluster, bool):
            msg = f"broker_options cluster must be True or False, got {cluster!r}"
            raise ConfigurationError(msg)
        #: Talk to a Redis Cluster (``broker_options={"cluster": True}`` or ``?cluster=true``).
        self.cluster = cluster
        self.key_prefix = str(options.pop("key_prefix", DEFAULT_KEY_PREFIX))
        if "{" in self.key_prefix or "}" in self.key_prefix:
            msg = f"broker_options key_prefix {self.key_prefix!r} must not contain braces: they mark the hash tag"
            raise ConfigurationError(msg)
        self.publish_retry_s = _seconds(options, "publish_retry_s", DEFAULT_PUBLISH_RETRY_S)
        self.socket_timeout_s = _seconds(options, "socket_timeout", DEFAULT_SOCKET_TIMEOUT_S)
        self._pool_kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": _seconds(options, "socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT_S),
            # No silent retries: a re-sent script whose reply was lost could run twice (lease
            # messages nobody receives). The pool replaces a connection the server closed when
            # it is taken out; outages are retried above, where an operation is known safe to repeat.
            "retry": Retry(redis.backoff.NoBackoff(), 0),
            # RESP2: the replies of every redis-py version >= 5 look the same.
            "protocol": 2,
            **options,
        }
        self._block_s = min(MAX_BLOCK_S, self.socket_timeout_s / 2)
        self._keys: dict[tuple[str, str], list[bytes]] = {}
        self._fresh: dict[str, tuple[list[bytes], bytes, bytes]] = {}
        self._lock = threading.Lock()
        self._conn: _Connection | _ClusterConnection | None = None
        try:
            # Parse now: a bad URL fails at App(), not at first use.
            parsed = connection_pool(self._redis_url).connection_kwargs
        except ValueError as exc:
            expected = (
                "redis://[:password@]host[:port][/db] or redis+sentinel://host[:port][,host[:port]...]/service[/db]"
            )
            msg = f"bad redis broker URL {mask_url(url)!r}: {exc}; expected {expected}"
            raise ConfigurationError(msg) from None
        if self.cluster and is_sentinel_url(url):
            msg = f"bad redis broker URL {mask_url(url)!r}: Sentinel and Redis Cluster do not go together; use one"
            raise ConfigurationError(msg)
        if self.cluster and parsed.get("db", 0) != 0:
            msg = f"bad redis broker URL {mask_url(url)!r}: a Redis Cluster has only database 0; drop the /db part"
            raise ConfigurationError(msg)

    def __repr__(self) -> str:
        return f"<RedisBroker {mask_url(self.url)}>"

    # -- connections and errors ----------------------------------------------------------

    def _connection(self) -> _Connection | _ClusterConnection:
        """This process's connection; a forked child builds its own, leaving the parent's alone."""
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        if conn is not None:
            # Forked: another thread of the parent may have held the lock at fork time.
            self._lock = threading.Lock()
        with self._lock:
            conn = self._conn
            if conn is None or conn.pid != os.getpid():
                if conn is not None:
                    _INHERITED.append(conn)
                if self.cluster:
                    conn = self._conn = _ClusterConnection(self._redis_url, self._pool_kwargs)
                else:
                    conn = self._conn = _Connection(self._redis_url, self._pool_kwargs)
        return conn

    def keys(self, queue: str, script: str = "receive") -> list[bytes]:
        """The Redis keys of ``queue`` that ``script`` gets, in its order (``_SCRIPT_KEYS``)."""
        found = self._keys.get((script, queue))
        if found is None:
            if not queue:
                msg = "a queue name must not be empty"
                raise ValueError(msg)
            found = [f"{self.key_prefix}:{{{queue}}}:{suffix}".encode() for suffix in _SCRIPT_KEYS[script]]
            if len(self._keys) < 10_000:  # a bounded cache: queue names come from users
                self._keys[(script, queue)] = found
        return found

    def _error(self, exc: redis.exceptions.RedisError, action: str) -> BrokerError:
        """A one-line broker error for a redis-py error, naming the URL and what to do."""
        where = f"redis broker {mask_url(self.url)}"
        if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)):
            return BrokerError(f"cannot {action} on {where}: {exc}; check the user and password in the URL")
        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            msg = f"cannot {action} on {where}: {str(exc).rstrip('.')}; is Redis running and reachable at that address?"
            return BrokerConnectionError(msg)
        return BrokerError(f"cannot {action} on {where}: {type(exc).__name__}: {exc}")

    def _run(self, action: str, name: str, queue: str, args: Sequence[Any]) -> Any:
        """Run script ``name`` on the keys of ``queue``."""
        try:
            return self._connection().run(name, self.keys(queue, name), args)
        except redis.exceptions.RedisError as exc:
            raise self._error(exc, action) from exc

    def _run_many(self, action: str, calls: Sequence[tuple[str, Sequence[bytes], Sequence[Any]]]) -> list[Any]:
        try:
            return self._connection().run_many(calls)
        except redis.exceptions.RedisError as exc:
            raise self._error(exc, action) from exc

    def _retry(self, first: BrokerConnectionError, operation: Callable[[], _T]) -> _T:
        """Retry ``operation``, which just failed with ``first``, until ``publish_retry_s`` ends."""
        deadline = time.monotonic() + self.publish_retry_s
        pause_s, attempt, error = RETRY_MIN_S, 1, first
        log.warning("%s; retrying for up to %gs", error, self.publish_retry_s)
        while (remaining_s := deadline - time.monotonic()) > 0:
            time.sleep(min(pause_s, remaining_s))
            pause_s = min(pause_s * 2, RETRY_MAX_S)
            attempt += 1
            try:
                return operation()
            except BrokerConnectionError as exc:
                error = exc
        msg = f"{error} (gave up after {attempt} attempts over {self.publish_retry_s:g}s)"
        raise BrokerConnectionError(msg) from error.__cause__

    def close(self) -> None:
        """Close this process's connections; a later call reconnects. A child never closes
        the connections it inherited."""
        conn = self._conn
        if conn is not None and conn.pid != os.getpid():
            self._lock = threading.Lock()  # the parent's may have been held at fork time
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            if conn.pid == os.getpid():
                conn.close()
            else:
                _INHERITED.append(conn)

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        delay_s: float = 0.0,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        message_id, delay_ms = _message_id(priority), _delay_ms(delay_s)
        action = f"publish to {queue!r}"
        if delay_ms > 0:
            args = (message_id, envelope.to_bytes(), delay_ms)
            send: Callable[[], object] = lambda: self._run(action, "publish", queue, args)  # noqa: E731
        else:
            # The common case, without a script: RPUSH "<id><body>" to the priority's list, then
            # the wake-up token (see _fresh_commands). The receive script does the rest.
            lists, notify, route = self._fresh_commands(queue)
            packed = _rpush(lists[priority], (message_id.encode() + envelope.to_bytes(),)) + notify
            send = lambda: self._send(action, packed, 2, route)  # noqa: E731
        try:
            send()
        except BrokerConnectionError as error:
            # The same id goes out again: if the first attempt did land, the receive script
            # keeps only one copy.
            self._retry(error, send)

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        # Ids and bodies first: a bad priority fails before anything is sent, and a retry
        # re-sends the same ids, which the receive script does not deliver twice.
        fresh: dict[tuple[str, int], list[bytes]] = {}
        delayed: list[tuple[str, Sequence[bytes], Sequence[Any]]] = []
        randomness = os.urandom(16 * len(messages)).hex()  # one call: a batch's ids, 32 digits each
        for i, m in enumerate(messages):
            message_id = f"{check_priority(m.priority)}{randomness[32 * i : 32 * i + 32]}"
            delay_ms = _delay_ms(m.delay_s)
            if delay_ms > 0:
                args = (message_id, m.envelope.to_bytes(), delay_ms)
                delayed.append(("publish", self.keys(m.queue, "publish"), args))
            else:
                fresh.setdefault((m.queue, m.priority), []).append(message_id.encode() + m.envelope.to_bytes())
        if messages:
            self._publish_batch(fresh, delayed)

    def publish_frames(self, batches: Mapping[tuple[str, int], Sequence[tuple[str, bytes]]]) -> None:
        """``publish_many`` of messages given as ``Envelope.to_bytes()`` frames, no delay, per
        (queue, priority), in order (taskframe.broker.FramePublisher): the same write."""
        fresh: dict[tuple[str, int], list[bytes]] = {}
        for (queue, priority), frames in batches.items():
            head = str(check_priority(priority)).encode()
            randomness = os.urandom(16 * len(frames)).hex().encode()  # the ids: 32 digits each
            fresh[(queue, priority)] = [
                head + randomness[32 * i : 32 * i + 32] + frame for i, (_, frame) in enumerate(frames)
            ]
        if any(fresh.values()):
            self._publish_batch(fresh, [])

    def _publish_batch(
        self, fresh: dict[tuple[str, int], list[bytes]], delayed: list[tuple[str, Sequence[bytes], Sequence[Any]]]
    ) -> None:
        """Send ``fresh`` ("<id><frame>" per queue and priority) and ``delayed`` publish scripts.

        One write: an RPUSH per queue and priority (FIFO kept), then a token per queue (after
        every RPUSH, so that no consumer wakes before all is there), and a script per delayed
        message. On a cluster, one write per queue (its keys share a slot, so a node). A retry
        re-sends the same ids, which the receive script does not deliver twice.
        """
        chunks: dict[str, list[bytes]] = {}
        tokens: dict[str, tuple[bytes, bytes]] = {}
        for (queue, priority), payloads in fresh.items():
            lists, notify, route = self._fresh_commands(queue)
            tokens[queue] = (notify, route)
            rpushes = (_rpush(lists[priority], payloads[i : i + CHUNK]) for i in range(0, len(payloads), CHUNK))
            chunks.setdefault(queue, []).extend(rpushes)
        if self.cluster:
            writes = [
                (b"".join(chunks[queue]) + notify, len(chunks[queue]) + 1, route)
                for queue, (notify, route) in tokens.items()
            ]
        else:
            every = [chunk for queue_chunks in chunks.values() for chunk in queue_chunks]
            notifies = [notify for notify, _ in tokens.values()]
            writes = [(b"".join(every) + b"".join(notifies), len(every) + len(notifies), b"")] if every else []

        def send() -> None:
            for packed, replies, route in writes:
                self._send("publish", packed, replies, route)
            if delayed:
                self._run_many("publish", delayed)

        try:
            send()
        except BrokerConnectionError as error:
            self._retry(error, send)

    def _fresh_commands(self, queue: str) -> tuple[list[bytes], bytes, bytes]:
        """For a publish to ``queue`` without delay: the start of the ``RPUSH`` to each
        priority's list, the packed ``ZADD`` that leaves the wake-up token (a sorted set
        of one member, so repeating it adds nothing), and a key of the queue (its slot)."""
        found = self._fresh.get(queue)
        if found is None:
            keys = dict(zip(_SUFFIXES, self.keys(queue, "receive"), strict=True))
            lists = [b"$5\r\nRPUSH\r\n$%d\r\n%s\r\n" % (len(keys[new]), keys[new]) for new in _NEW]
            notify = resp("ZADD", keys["wake"], 0, 1)
            found = (lists, notify, keys["wake"])
            if len(self._fresh) < 10_000:  # bounded, as self._keys
                self._fresh[queue] = found
        return found

    def _send(self, action: str, packed: bytes, replies: int, route: bytes) -> list[Any]:
        try:
            results = self._connection().send(packed, replies, route)
        except redis.exceptions.RedisError as exc:
            raise self._error(exc, action) from exc
        for result in results:
            if isinstance(result, redis.exceptions.RedisError):
                raise self._error(result, action) from result
        return results

    # -- consuming -----------------------------------------------------------------------

    def consumer(self, queues: Sequence[str], *, prefetch: int) -> RedisConsumer:
        """A consumer of ``queues``; pings Redis, so a worker reconnecting backs off while it is down."""
        consumer = RedisConsumer(self, queues, prefetch=prefetch)
        try:
            self._connection().ping()
        except redis.exceptions.RedisError as exc:
            raise self._error(exc, "connect") from exc
        return consumer

    # -- inspection and administration --------------------------------------------------

    def stats(self, queue: str) -> QueueStats:
        ready, delayed, reserved, dead = self._run("read stats", "stats", queue, ())
        return QueueStats(queue, ready=int(ready), delayed=int(delayed), reserved=int(reserved), dead=int(dead))

    def purge(self, queue: str) -> int:
        return int(self._run(f"purge {queue!r}", "purge", queue, ()))

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        flat = self._run("list dead letters", "dead_list", queue, (limit,))
        return [_dead_letter(queue, *flat[i : i + 3]) for i in range(0, len(flat), 3)]

    def requeue_dead(self, queue: str) -> int:
        return int(self._run("requeue dead letters", "requeue_dead", queue, ()))

    def purge_dead(self, queue: str) -> int:
        return int(self._run("purge dead letters", "purge_dead", queue, ()))


class RedisConsumer:
    """Leases messages of a fixed list of queues; see :class:`taskframe.broker.Consumer`.

    Nothing is buffered between calls: the worker asks for what it has room for through
    ``max_messages``, so ``prefetch`` needs no enforcing here. Ack, nack and renew work on any
    delivery of the same broker, whichever consumer received it (the worker makes a new
    consumer after a lost connection and settles the old one's deliveries through it).

    On a Redis Cluster, queues whose keys share one slot are read by one script, as on one
    server; queues on several slots are read slot by slot (see _lease_across_slots).
    """

    def __init__(self, broker: RedisBroker, queues: Sequence[str], *, prefetch: int) -> None:
        check_queues(queues)
        self.broker = broker
        self.queues = list(queues)
        self.prefetch = prefetch
        self.id = uuid.uuid4().hex[:16]
        self._receipts = itertools.count(1)
        self._keys = [key for queue in self.queues for key in broker.keys(queue, "receive")]
        wake = _SCRIPT_KEYS["receive"].index("wake")
        self._wake_keys = [broker.keys(queue, "receive")[wake] for queue in self.queues]
        self._closed = False
        self._buried = BuriedLog()
        # No script can span cluster slots: then a receive peeks at each queue, then leases
        # from each, and an idle wait blocks on the first queue only, a slice at a time.
        across_slots = broker.cluster and len({key_slot(key) for key in self._wake_keys}) > 1
        self._take = self._lease_across_slots if across_slots else self._lease
        # One server holds every key: BZPOPMIN, acks and the receive script can go in one write.
        self._one_server = not broker.cluster
        self._block_keys = self._wake_keys[:1] if across_slots else self._wake_keys
        self._block_max_s = min(CLUSTER_POLL_S, broker._block_s) if across_slots else broker._block_s

    def __repr__(self) -> str:
        return f"<RedisConsumer {self.id} of {self.queues} on {self.broker!r}>"

    def receive(self, timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        check_receive(self, closed=self._closed, max_messages=max_messages)
        return self._receive_after(self._take(max_messages), timeout_s, max_messages)

    def ack_and_receive(self, acks: Sequence[Delivery], timeout_s: float, *, max_messages: int = 1) -> list[Delivery]:
        """``ack_many(acks)`` and a receive in one write (the ack scripts run first); see
        taskframe.broker.AcksWithReceive. On a cluster: the two steps."""
        check_receive(self, closed=self._closed, max_messages=max_messages)
        if not self._one_server or not acks:
            self.ack_many(acks)
            return self.receive(timeout_s, max_messages=max_messages)
        return self._receive_after(self._lease(max_messages, acks=acks), timeout_s, max_messages)

    def _receive_after(self, first: tuple[list[Delivery], int], timeout_s: float, max_messages: int) -> list[Delivery]:
        """What ``receive`` returns, given the result of its first take."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        deliveries, wait_ms = first
        while not deliveries:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return []
            if wait_ms >= 0:
                remaining_s = min(remaining_s, wait_ms / 1000)
            deliveries, wait_ms = self._block_then_take(min(remaining_s, self._block_max_s), max_messages)
        return deliveries

    def _lease(
        self, limit: int, *, block_s: float | None = None, acks: Sequence[Delivery] = ()
    ) -> tuple[list[Delivery], int]:
        """One script: promote what is due, lease up to ``limit``; returns (deliveries, wait_ms).
        With ``block_s``, the script waits behind a BZPOPMIN of the wake-up tokens; with
        ``acks``, it follows their ack scripts (one write either way)."""
        broker = self.broker
        token = f"{self.id}.{next(self._receipts)}"
        args = (limit, round(broker.visibility_timeout_s * 1000), broker.max_deliveries, token, PROMOTE_BATCH)
        try:
            conn = broker._connection()
            if acks:
                calls = [*self._ack_calls(acks), ("receive", self._keys, args)]
                wait_ms, buried, leased = conn.run_many(calls)[-1]
            elif block_s is None:
                wait_ms, buried, leased = conn.run("receive", self._keys, args)
            else:
                assert isinstance(conn, _Connection)
                wait_ms, buried, leased = conn.block_then_run(self._block_keys, block_s, "receive", self._keys, args)
        except redis.exceptions.RedisError as exc:
            raise broker._error(exc, "receive" if block_s is None else "wait for messages") from exc
        return self._deliveries(self.queues, token, buried, leased), int(wait_ms)

    def _block_then_take(self, block_s: float, limit: int) -> tuple[list[Delivery], int]:
        """Wait for a wake-up (or ``block_s``), then take: pipelined on a standalone Redis,
        two steps on a cluster (the queues' keys may live on other nodes than the tokens)."""
        if self._one_server:
            return self._lease(limit, block_s=block_s)
        self._block(block_s)
        return self._take(limit)

    def _lease_across_slots(self, limit: int) -> tuple[list[Delivery], int]:
        """``_lease`` for queues on several cluster slots: a peek script per queue says what is
        ready at each priority (after promoting what is due), then a receive script per queue
        leases its share of the ``limit`` most urgent (priority first, then queue order), and
        the deliveries come back in that order. Each script is atomic; the pair is not, so a
        message another consumer takes in between is simply not in this batch."""
        broker = self.broker
        keys = [broker.keys(queue, "receive") for queue in self.queues]
        try:
            conn = broker._connection()
            peeks = conn.run_many([("peek", queue_keys, (PROMOTE_BATCH,)) for queue_keys in keys])
            wants, floors, left = [0] * len(keys), [0] * len(keys), limit
            for priority in range(9, -1, -1):
                for q, peek in enumerate(peeks):
                    n = min(int(peek[10 - priority]), left)
                    if n:
                        wants[q], floors[q], left = wants[q] + n, priority, left - n
                if not left:
                    break
            if not any(wants):
                waits = [int(peek[0]) for peek in peeks if int(peek[0]) >= 0]
                return [], min(waits, default=-1)
            token = f"{self.id}.{next(self._receipts)}"
            lease_ms = round(broker.visibility_timeout_s * 1000)
            chosen = [q for q, want in enumerate(wants) if want]
            calls = [
                ("receive", keys[q], (wants[q], lease_ms, broker.max_deliveries, token, PROMOTE_BATCH, floors[q]))
                for q in chosen
            ]
            results = conn.run_many(calls)
        except redis.exceptions.RedisError as exc:
            raise broker._error(exc, "receive") from exc
        deliveries: list[Delivery] = []
        for q, (_, buried, leased) in zip(chosen, results, strict=True):
            deliveries += self._deliveries(self.queues[q : q + 1], token, buried, leased)
        # Stable: queue order, then FIFO, within a priority. The id starts with the priority.
        deliveries.sort(key=lambda delivery: -int(delivery.tag[1][0]))
        return deliveries, 0  # 0: another consumer was faster; look again at once

    def _deliveries(self, queues: list[str], token: str, buried: list[Any], leased: list[Any]) -> list[Delivery]:
        """The deliveries of a receive script's reply on ``queues`` (what it returned as 1, 2, ...)."""
        broker = self.broker
        for i in range(0, len(buried), 3):
            queue, message_id, count = queues[int(buried[i]) - 1], buried[i + 1].decode(), int(buried[i + 2])
            # The receive script's own reason (it stores it with the dead letter).
            reason = (
                f"delivered {count} times without an ack (max_deliveries={broker.max_deliveries}):"
                " the task probably crashed its worker"
            )
            log.warning("message %s of queue %r dead-lettered: %s", message_id, queue, reason)
            self._report_buried(queue, message_id, reason)
        deliveries = []
        for i in range(0, len(leased), 4):
            queue = queues[int(leased[i]) - 1]
            message_id, count, body = leased[i + 1].decode(), int(leased[i + 2]), leased[i + 3]
            tag = (queue, message_id, token)
            try:
                envelope = Envelope.from_bytes(body)
            except MessageError as exc:
                reason = f"unreadable frame: {exc}"
                broker._run("dead-letter", "nack", queue, (message_id, token, 0, 0, reason))
                log.warning("message %s of queue %r dead-lettered: %s", message_id, queue, exc)
                continue
            deliveries.append(Delivery(envelope, queue, count, tag))
        return deliveries

    def _report_buried(self, queue: str, message_id: str, reason: str) -> None:
        """Keep a dead-lettered message for ``take_buried``: its body stays in the queue's body
        hash (rare: one read per dead letter). Best effort: a message that cannot be read
        back has no task id to report."""
        try:
            body = self.broker._connection().client.hget(self.broker.keys(queue, "dead_list")[0], message_id)
            if isinstance(body, bytes) and body:
                self._buried.add_frame(body, queue, reason)
        except redis.exceptions.RedisError as exc:
            log.debug("dead letter %s of %r not reported: %s", message_id, queue, exc)

    def take_buried(self) -> list[Buried]:
        """What this consumer dead-lettered after ``max_deliveries`` since the last call."""
        return self._buried.take()

    def _block(self, timeout_s: float) -> None:
        """On a cluster, wait on the queues' wake-up tokens for a publish, a requeue or a new
        delay (on one server the block rides with the take: ``_Connection.block_then_run``)."""
        try:
            conn = self.broker._connection()
            assert isinstance(conn, _ClusterConnection)
            conn.block(self._block_keys, timeout_s)
        except redis.exceptions.RedisError as exc:
            raise self.broker._error(exc, "wait for messages") from exc

    def ack(self, delivery: Delivery) -> None:
        queue, message_id, token = delivery.tag
        self.broker._run("ack", "ack", queue, (message_id, token))

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack ``deliveries`` in one round trip: one script per queue (and CHUNK deliveries)."""
        calls = self._ack_calls(deliveries)
        if calls:
            self.broker._run_many("ack", calls)

    def _ack_calls(self, deliveries: Sequence[Delivery]) -> list[tuple[str, Sequence[bytes], Sequence[Any]]]:
        by_queue: dict[str, list[str]] = {}
        for delivery in deliveries:
            queue, message_id, token = delivery.tag
            by_queue.setdefault(queue, []).extend((message_id, token))
        return [
            ("ack", self.broker.keys(queue, "ack"), pairs[i : i + 2 * CHUNK])
            for queue, pairs in by_queue.items()
            for i in range(0, len(pairs), 2 * CHUNK)
        ]

    def nack(self, delivery: Delivery, *, requeue: bool, reason: str = "", delay_s: float = 0.0) -> None:
        queue, message_id, token = delivery.tag
        args = (message_id, token, int(requeue), _delay_ms(delay_s), reason or "rejected by the worker")
        self.broker._run("nack", "nack", queue, args)

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand back deliveries whose task never started, with the count they had before."""
        calls = []
        for delivery in deliveries:
            queue, message_id, token = delivery.tag
            calls.append(("nack", self.broker.keys(queue, "nack"), (message_id, token, 1, 0, "released", 1)))
        if calls:
            self.broker._run_many("release", calls)

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        by_queue: dict[str, list[str]] = {}
        for delivery in deliveries:
            queue, message_id, token = delivery.tag
            by_queue.setdefault(queue, []).extend((message_id, token))
        lease_ms = round(self.broker.visibility_timeout_s * 1000)
        calls = [("renew", self.broker.keys(queue, "renew"), (lease_ms, *pairs)) for queue, pairs in by_queue.items()]
        renewed = sum(int(n) for n in self.broker._run_many("renew leases", calls))
        warn_lost_leases(log, len(deliveries) - renewed, len(deliveries))

    def close(self) -> None:
        # Nothing is buffered: unacked deliveries come back when their leases end.
        self._closed = True


def _seconds(options: dict[str, Any], name: str, default: float) -> float:
    value = options.pop(name, default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # A socket timeout of 0 would make redis-py's sockets non-blocking.
    if not is_number or value < 0 or (value == 0 and name.startswith("socket")):
        msg = f"broker_options {name} must be a number of seconds (above 0 for socket timeouts), got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


def _split_cluster_query(url: str) -> tuple[str, bool]:
    """``url`` without its ``cluster`` query parameter (redis-py does not know it), and its value."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [value for name, value in query if name == "cluster"]
    if not values:
        return url, False
    if values[-1].lower() not in ("true", "false", "yes", "no", "1", "0"):
        msg = f"bad redis broker URL {mask_url(url)!r}: cluster={values[-1]!r}; use cluster=true or cluster=false"
        raise ConfigurationError(msg)
    rest = urlencode([(name, value) for name, value in query if name != "cluster"])
    return urlunsplit(parts._replace(query=rest)), values[-1].lower() in ("true", "yes", "1")


def _delay_ms(delay_s: float) -> int:
    return max(0, round(delay_s * 1000))


def _dead_letter(queue: str, raw_id: bytes, raw_info: bytes, body: bytes) -> DeadLetter:
    deliveries, dead_at, reason = json.loads(raw_info)
    try:
        envelope = Envelope.from_bytes(body)
    except MessageError:
        # Listing must work even for the garbage that got a message buried.
        envelope = Envelope(body=bytes(body), headers={}, content_encoding="binary")
    task = envelope.headers.get("task")
    return DeadLetter(
        id=raw_id.decode(),
        task=str(task) if task is not None else None,
        queue=queue,
        deliveries=int(deliveries),
        reason=str(reason),
        dead_at=float(dead_at),
        envelope=envelope,
    )


if TYPE_CHECKING:  # mypy proves the adapter still fits the core's protocols

    def _fits(url: str, conf: Settings) -> tuple[Broker, Consumer]:
        broker = RedisBroker(url, conf)
        return broker, broker.consumer(["q"], prefetch=1)
