#!/bin/sh
# One Redis node of the profile "ha" (docker-compose.yml): the services
# `redis` and `redis-replica` start through this script instead of
# `redis-server` directly (REDIS_START). Usage, as redis-server's:
#   node.sh <redis.conf> [redis-server options...]
#   node.sh health   the healthcheck: this node is a master, or a replica
#                    whose link to its master is up (ROLE: connected)
#
# It writes /tmp/node.conf (the container's tmpfs; Sentinel's CONFIG
# REWRITE lands there) holding:
#   include <redis.conf>          the stack's settings and users
#   masteruser/masterauth         the `default` user and the Redis password
#                                 (secret), so either node can replicate
#                                 from the other after a failover
#   replicaof <address> <port>    unless this node is the master
# The master is the one the sentinels name: a node that comes back after a
# failover follows the promoted one instead of coming up as a second
# master. When no sentinel answers (the stack's first start, or every
# sentinel down), REDIS_PRIMARY (`redis`) is the master and the others
# replicate from it; a replica that cannot reach it exits (its restart
# policy tries again). This container's own addresses are the ones Docker
# wrote into /etc/hosts (see lib.sh for why addresses, not names).
#
# Settings (environment): REDIS_NODE (this node's service name, required),
# REDIS_PRIMARY (default redis), REDIS_SENTINELS (space-separated hosts,
# port 26379), REDIS_MASTER_NAME (default taskstack), REDIS_PASSWORD_FILE
# (default /run/secrets/redis_password; the sentinels use it too),
# REDIS_ASK_TIMEOUT (2 s).
set -eu
. "${0%/*}/lib.sh"
if [ "${1:-}" = health ]; then
  read_password "${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}"
  role=$(ask ROLE)
  case ${role%%"$nl"*} in
    master) exit 0 ;;
    slave)
      # slave, the master's address, its port, the link's state, offset.
      state=${role#*"$nl"*"$nl"*"$nl"}
      [ "${state%%"$nl"*}" = connected ]
      exit ;;
    *) exit 1 ;;
  esac
fi
conf=${1:?usage: node.sh <redis.conf> [redis-server options...]}
shift
node=${REDIS_NODE:?REDIS_NODE must name this node (its service name)}
primary=${REDIS_PRIMARY:-redis}
read_password "${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}"
own=' '
while read -r ip _; do
  case $ip in
    '' | '#'* | 127.* | *:*) ;;
    *) own="$own$ip " ;;
  esac
done < /etc/hosts

if ! master_from_sentinels ""; then
  if [ "$node" = "$primary" ]; then
    echo "node.sh: no sentinel names a master of $name; $node is the master"
  elif master=$(address_of "$primary" 6379); then
    echo "node.sh: no sentinel names a master of $name; $primary ($master) is the master"
  else
    echo "node.sh: neither a sentinel nor $primary answers: no master to replicate from" >&2
    exit 1
  fi
fi
case $own in
  *" $master "*) master= ;;
esac
{
  printf 'include %s\n' "$conf"
  printf 'masteruser default\nmasterauth %s\n' "$password"
  if [ -n "$master" ]; then
    printf 'replicaof %s %s\n' "$master" "$port"
  fi
} > /tmp/node.conf
if [ -n "$master" ]; then
  echo "node.sh: $node starts as a replica of $master:$port"
else
  echo "node.sh: $node starts as the master"
fi
exec redis-server /tmp/node.conf "$@"
