"""The Lua script behind :class:`~stages.llm._redis_limiter.RedisRateLimiter`, and its reply.

One call reads Redis's clock, applies what the calling process reports (a pause, token
corrections, the latest rate-limit headers it saw, a switch to short-window mode), and takes
a turn if one is due within the slack, with the GCRA model of :mod:`stages.llm._limits`.
"""

from __future__ import annotations

from typing import Any

from stages.llm._limits import Costs

__all__ = ["KEEP_S", "SCRIPT", "Reply"]

# KEYS[1]: the limiter's hash. ARGV[1..7]: take a turn (1/0), slack, pause seconds, switch to
# short windows (1/0), guess seconds, smooth seconds, burst seconds (-1: the server's). Then 11
# values per bucket (requests, tokens, input, output): rate/s (0: none), cost, correction,
# sync (1/0), remaining, ticket (-1: none), capacity (-1: unknown), authoritative (1/0), reset
# seconds (-1: unknown), the synced request's id (-1: none) and when its answer came (wall
# clock, -1: unknown). Then pairs (request id, when it ended; -1: it was never sent) for the
# requests of this process that ended since its last call.
# Fields: t1..t4 (theoretical arrival times), n1..n4 (units ever taken), k1..k4 (capacities the
# server revealed), r1..r4 (rates per second in force), pause (paused until), smooth (1 once
# short windows were detected).
# Beside the hash, two sorted sets of requests ("id taken c1 c2 c3 c4"): KEYS[1]..':open'
# (ticketed, not ended; by id) and KEYS[1]..':ended' (by when they ended, kept KEEP_S). A
# request ticketed before the one whose headers are synced but still open when that answer
# came may have reached the server after it (a process waiting for a connection, a server
# that takes its connections in any order): it is "late", in neither the server's count nor
# the tickets taken after. So a header says the bucket holds between `remaining - after -
# late` and `remaining - after` units: the shared bucket is raised to the first, never
# higher (that would overshoot), and lowered to the second, never lower (that would stall
# every process until it refilled), so between the two it follows the tickets taken.
KEEP_S = 120.0
"""How long an ended request stays in the ended set, and an open one in the open set (its
process is gone, or it was abandoned without a word)."""

SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local take = tonumber(ARGV[1])
local slack = tonumber(ARGV[2])
local pause_s = tonumber(ARGV[3])
local go_smooth = tonumber(ARGV[4])
local guess = tonumber(ARGV[5])
local smooth_s = tonumber(ARGV[6])
local burst = tonumber(ARGV[7])
local open_key = key .. ':open'
local ended_key = key .. ':ended'
local keep = KEEP_S
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local names = {'pause', 'smooth', 't1', 't2', 't3', 't4', 'n1', 'n2', 'n3', 'n4',
  'k1', 'k2', 'k3', 'k4', 'r1', 'r2', 'r3', 'r4'}
local unpack = unpack or table.unpack
local got = redis.call('HMGET', key, unpack(names))
local pause_until = tonumber(got[1]) or 0
local smooth = tonumber(got[2]) or 0
local tat, cnt, cap, rates = {}, {}, {}, {}
for i = 1, 4 do
  tat[i] = tonumber(got[2 + i]) or 0
  cnt[i] = tonumber(got[6 + i]) or 0
  cap[i] = tonumber(got[10 + i]) or -1
  -- a process that knows no rate uses the one another process configured or learned
  rates[i] = tonumber(ARGV[8 + (i - 1) * 11])
  if rates[i] <= 0 then rates[i] = tonumber(got[14 + i]) or 0 end
end
if pause_s > 0 then pause_until = math.max(pause_until, now + pause_s) end
local switched = go_smooth == 1 and smooth == 0
if switched then smooth = 1 end

local function size(rate, capacity)
  if smooth == 1 then return math.max(rate * smooth_s, 1) end
  local units
  if capacity >= 0 then
    units = capacity
    if burst >= 0 then units = math.min(units, rate * burst) end
  elseif burst >= 0 then
    units = rate * burst
  else
    units = rate * guess
  end
  return math.max(units, 1)
end

-- requests of this process that ended since its last call leave the open set
for j = 52, #ARGV, 2 do
  local id = tonumber(ARGV[j])
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', open_key, id, id)) do
    redis.call('ZREM', open_key, m)
    if tonumber(ARGV[j + 1]) >= 0 then redis.call('ZADD', ended_key, ARGV[j + 1], m) end
  end
end
redis.call('ZREMRANGEBYSCORE', ended_key, '-inf', now - keep)

-- the units of requests ticketed before request `id` but open when its answer came (at `at`)
local lates = {}
local function late(id, at)
  local memo = id .. ' ' .. at
  if lates[memo] then return lates[memo] end
  local sum = {0, 0, 0, 0}
  local function add(m, stale)
    local f = {}
    for x in string.gmatch(m, '%S+') do f[#f + 1] = tonumber(x) end
    if stale and f[2] < now - keep then
      redis.call('ZREM', open_key, m)  -- its process is gone
    elseif f[1] < id then
      for i = 1, 4 do sum[i] = sum[i] + f[2 + i] end
    end
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', open_key, '-inf', '(' .. id)) do
    add(m, true)
  end
  if at >= 0 then
    local after_it = string.format('(%.6f', at)
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', ended_key, after_it, '+inf')) do
      add(m, false)
    end
  end
  lates[memo] = sum
  return sum
end

-- what one answer's headers say of bucket i, applied at `base` (when they reached Redis):
-- at most `remaining - after` units are left, at least that less the late ones. The bucket
-- is raised to the least, lowered to the most (a later tat means fewer units); `after`
-- counts every ticket since, so the same answer is applied again while its late requests
-- end (they may have been answered before it after all), raising the bucket as they do.
local function follow(i, rate, units, y, authoritative)
  local after = 0
  if y.ticket >= 0 then after = cnt[i] - y.ticket end
  local early = 0
  if y.id >= 0 then early = late(y.id, y.at)[i] end
  local fewest = y.base + (units - math.min(y.remaining - after - early, units)) / rate
  local most = y.base + (units - math.min(y.remaining - after, units)) / rate
  if y.reset >= 0 then
    fewest = math.min(fewest, y.base + y.reset + (after + early) / rate)
    most = math.min(most, y.base + y.reset + after / rate)
  end
  if authoritative then
    tat[i] = math.max(math.min(tat[i], fewest), most)
  elseif most > tat[i] then
    tat[i] = most
  end
end

local synced = redis.call('HMGET', key, 'y1', 'y2', 'y3', 'y4')
local start = math.max(now, pause_until)
for i = 1, 4 do
  local b = 8 + (i - 1) * 11
  local rate = rates[i]
  if rate > 0 then
    local cost = tonumber(ARGV[b + 1])
    local correction = tonumber(ARGV[b + 2])
    if correction ~= 0 then tat[i] = tat[i] + correction / rate end  -- a past tat is full
    local stored = nil
    if synced[i] then
      local f = {}
      for x in string.gmatch(synced[i], '%S+') do f[#f + 1] = tonumber(x) end
      stored = {ticket = f[1], remaining = f[2], id = f[3], at = f[4], reset = f[5], base = f[6]}
      if now - stored.base > keep / 2 or smooth == 1 then
        stored = nil
        redis.call('HDEL', key, 'y' .. i)
      end
    end
    if tonumber(ARGV[b + 3]) == 1 then
      local capacity = tonumber(ARGV[b + 6])
      if capacity >= 0 and smooth == 0 and capacity ~= cap[i] then
        -- the units free stay as they were: the server's word comes next
        local was = size(rate, cap[i])
        cap[i] = capacity
        tat[i] = math.max(tat[i], now) + (size(rate, cap[i]) - was) / rate
      end
      local y = {ticket = tonumber(ARGV[b + 5]), remaining = tonumber(ARGV[b + 4]),
        id = tonumber(ARGV[b + 9]), at = tonumber(ARGV[b + 10]),
        reset = tonumber(ARGV[b + 8]), base = now}
      local authoritative = tonumber(ARGV[b + 7]) == 1 and smooth == 0
      follow(i, rate, size(rate, cap[i]), y, authoritative)
      if authoritative and y.id >= 0 and y.at >= 0 and (not stored or y.id >= stored.id) then
        redis.call('HSET', key, 'y' .. i, string.format('%s %s %s %.6f %s %.6f',
          fmt(y.ticket), fmt(y.remaining), fmt(y.id), y.at, fmt(y.reset), now))
        stored = nil
      end
    end
    if stored then follow(i, rate, size(rate, cap[i]), stored, true) end
    if switched then tat[i] = now + size(rate, cap[i]) / rate end
    start = math.max(start, tat[i] - math.max(size(rate, cap[i]) - cost, 0) / rate)
  end
end

local wait = start - now
local taken = 0
if take == 1 and wait <= slack then
  taken = 1
  for i = 1, 4 do
    local b = 8 + (i - 1) * 11
    local rate = rates[i]
    local cost = tonumber(ARGV[b + 1])
    cnt[i] = cnt[i] + cost
    if rate > 0 then tat[i] = math.max(tat[i], start) + cost / rate end
  end
  local costs = {}
  for i = 1, 4 do costs[i] = string.format('%.3f', tonumber(ARGV[8 + (i - 1) * 11 + 1])) end
  redis.call('ZADD', open_key, cnt[1],
    string.format('%d %.3f %s %s %s %s', math.floor(cnt[1] + 0.5), now, unpack(costs)))
end

redis.call('HSET', key, 'pause', fmt(pause_until), 'smooth', tostring(smooth),
  't1', fmt(tat[1]), 't2', fmt(tat[2]), 't3', fmt(tat[3]), 't4', fmt(tat[4]),
  'n1', fmt(cnt[1]), 'n2', fmt(cnt[2]), 'n3', fmt(cnt[3]), 'n4', fmt(cnt[4]),
  'k1', fmt(cap[1]), 'k2', fmt(cap[2]), 'k3', fmt(cap[3]), 'k4', fmt(cap[4]),
  'r1', fmt(rates[1]), 'r2', fmt(rates[2]), 'r3', fmt(rates[3]), 'r4', fmt(rates[4]))
local horizon = math.max(tat[1], tat[2], tat[3], tat[4], pause_until) - now
redis.call('PEXPIRE', key, math.ceil((math.max(horizon, 0) + keep) * 1000))
redis.call('PEXPIRE', open_key, math.ceil((math.max(horizon, 0) + keep) * 1000))
redis.call('PEXPIRE', ended_key, math.ceil((math.max(horizon, 0) + keep) * 1000))
local burst1 = -1
if rates[1] > 0 then burst1 = size(rates[1], cap[1]) end
return {fmt(wait), tostring(taken), fmt(cnt[1]), fmt(cnt[2]), fmt(cnt[3]), fmt(cnt[4]),
  tostring(smooth), fmt(pause_until - now), fmt(burst1),
  fmt(rates[1]), fmt(rates[2]), fmt(rates[3]), fmt(rates[4])}
""".replace("KEEP_S", repr(KEEP_S))


class Reply:
    """What one script call said (its reply parsed)."""

    __slots__ = ("burst", "counts", "paused_s", "per_minute", "smooth", "taken", "wait")

    def __init__(self, raw: Any) -> None:
        values = [float(v) for v in raw]
        self.wait = max(values[0], 0.0)
        self.taken = values[1] == 1
        self.counts: Costs = (values[2], values[3], values[4], values[5])
        self.smooth = values[6] == 1
        self.paused_s = values[7]
        self.burst = values[8] if values[8] >= 0 else None
        self.per_minute = [rate * 60.0 if rate > 0 else None for rate in values[9:13]]
