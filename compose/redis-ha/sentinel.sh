#!/bin/sh
# One Redis Sentinel of the profile "ha" (docker-compose.yml).
#   sentinel.sh          writes /tmp/sentinel.conf and runs the sentinel
#   sentinel.sh health   the healthcheck: this sentinel answers and sees a
#                        master and enough sentinels to fail it over
#                        (SENTINEL CKQUORUM)
#
# The configuration is written at every start (Sentinel rewrites it while
# it runs, so it lives on the container's tmpfs): the master it monitors is
# the one another sentinel names, else the node that reports the master
# role (none: it exits, and its restart policy tries again). A restarted
# sentinel so follows a failover that happened while it was away; its
# epoch comes back from the others' hello messages. The sentinels and the
# nodes share the Redis password (secret): it is the sentinels' own
# password (requirepass, sentinel-pass) and the one they use on the nodes
# (auth-pass). The master is monitored at its IP address, never by name
# (see lib.sh); replicas and the other sentinels it learns by address too.
#
# Settings (environment): SENTINEL_NAME (this sentinel's service name,
# required), REDIS_NODES (space-separated node hosts, default "redis
# redis-replica"), REDIS_SENTINELS, REDIS_MASTER_NAME (default taskstack),
# SENTINEL_QUORUM (2), SENTINEL_DOWN_AFTER_MS (5000),
# SENTINEL_FAILOVER_TIMEOUT_MS (60000), REDIS_PASSWORD_FILE
# (/run/secrets/redis_password), REDIS_ASK_TIMEOUT (2 s).
set -eu
. "${0%/*}/lib.sh"
read_password "${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}"
if [ "${1:-}" = health ]; then
  ask -p 26379 SENTINEL CKQUORUM "$name" >/dev/null
  exit
fi
self=${SENTINEL_NAME:?SENTINEL_NAME must name this sentinel (its service name)}
if ! master_from_sentinels "$self"; then
  for node in ${REDIS_NODES:-redis redis-replica}; do
    if role=$(ask -h "$node" -p 6379 ROLE) && [ "${role%%"$nl"*}" = master ] \
        && master=$(address_of "$node" 6379); then
      echo "sentinel.sh: $node ($master) reports the master role"
      break
    fi
    master=
  done
fi
if [ -z "$master" ]; then
  echo "sentinel.sh: neither a sentinel nor a node (${REDIS_NODES:-redis redis-replica}) names the master" >&2
  exit 1
fi
{
  printf 'port 26379\ndir /tmp\n'
  printf 'requirepass %s\nsentinel sentinel-pass %s\n' "$password" "$password"
  printf 'sentinel monitor %s %s %s %s\n' "$name" "$master" "$port" "${SENTINEL_QUORUM:-2}"
  printf 'sentinel auth-pass %s %s\n' "$name" "$password"
  printf 'sentinel down-after-milliseconds %s %s\n' "$name" "${SENTINEL_DOWN_AFTER_MS:-5000}"
  printf 'sentinel failover-timeout %s %s\n' "$name" "${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}"
  printf 'sentinel parallel-syncs %s 1\n' "$name"
} > /tmp/sentinel.conf
echo "sentinel.sh: $self monitors $name at $master:$port"
exec redis-server /tmp/sentinel.conf --sentinel
