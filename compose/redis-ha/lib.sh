# Shared by node.sh and sentinel.sh (sourced; the profile "ha" of
# docker-compose.yml mounts this directory at /usr/local/etc/redis/ha).
# Only shell built-ins, redis-cli and timeout (the images have no other
# tools). Each question to another container is bounded by
# REDIS_ASK_TIMEOUT (default 2 s): a service that does not run has no
# name, and on an `internal` network the lookup of an unknown name hangs
# for 40 s.
#
# Addresses, not names: Docker's DNS does not answer for a container that
# is stopped, and Redis and Sentinel resolve names in their main loop. So
# the nodes and the sentinels only ever hold IP addresses: a name is turned
# into its address once, by asking the node itself (CLIENT INFO's `laddr`).

name=${REDIS_MASTER_NAME:-taskstack}
nl='
'

# Sets $password from the file $1 (the secret has no trailing newline:
# `read` then reports end of file but has read the line).
read_password() {
  password=
  read -r password < "$1" || true
  if [ -z "$password" ]; then
    echo "${0##*/}: $1 is empty or unreadable" >&2
    exit 1
  fi
}

# redis-cli with the password, bounded, raw replies, errors as failures.
ask() {
  REDISCLI_AUTH=$password timeout "${REDIS_ASK_TIMEOUT:-2}" redis-cli -e --no-auth-warning --raw "$@" 2>/dev/null
}

# The address the node at host $1, port $2 sees itself at (CLIENT INFO's
# laddr, without the port).
address_of() {
  reply=$(ask -h "$1" -p "$2" CLIENT INFO) || return 1
  laddr=${reply#*laddr=}
  [ "$laddr" != "$reply" ] || return 1
  laddr=${laddr%% *}
  printf '%s\n' "${laddr%:*}"
}

# Sets $master and $port to the master the first sentinel of
# REDIS_SENTINELS (other than $1) that answers names; fails when none does.
master_from_sentinels() {
  master=
  port=6379
  for sentinel in ${REDIS_SENTINELS:-}; do
    [ "$sentinel" = "$1" ] && continue
    if reply=$(ask -h "$sentinel" -p 26379 SENTINEL get-master-addr-by-name "$name"); then
      master=${reply%%"$nl"*}
      if [ -n "$master" ]; then
        port=${reply#*"$nl"}
        port=${port%%"$nl"*}
        echo "${0##*/}: sentinel $sentinel names $master:$port the master of $name"
        return 0
      fi
    fi
  done
  master=
  return 1
}
