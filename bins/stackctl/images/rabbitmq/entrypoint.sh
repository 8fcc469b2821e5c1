#!/bin/sh
# Entrypoint of localhost/taskstack-rabbitmq (made by `stackctl build
# --rabbitmq`; run by dash, copied from the build host, because RabbitMQ's
# own start scripts are shell scripts too). Variables:
#   RABBITMQ_USER           the user the services log in as (default taskstack)
#   RABBITMQ_VHOST          its virtual host (default /)
#   RABBITMQ_PASSWORD_FILE  its password (a compose secret)
# On every start the user, the vhost and the user's permissions on it are
# written as a definitions file on /tmp (a tmpfs in the compose file) that
# RabbitMQ imports at boot (`load_definitions` in /etc/rabbitmq/rabbitmq.conf),
# so rotating the password is: write the new secret, recreate the container,
# restart the services. No `guest` user is ever created (RabbitMQ seeds no
# default user when it has definitions to load).
set -eu
user=${RABBITMQ_USER:-taskstack}
vhost=${RABBITMQ_VHOST:-/}
pwfile=${RABBITMQ_PASSWORD_FILE:-/run/secrets/rabbitmq_password}
defs=/tmp/taskstack-definitions.json

die() {
  echo "taskstack-rabbitmq: $*" >&2
  exit 2
}

case $user in '' | *[!A-Za-z0-9_.-]*) die "RABBITMQ_USER=$user: use letters, digits, _ . and - only" ;; esac
case $vhost in '' | *[!A-Za-z0-9_./-]*) die "RABBITMQ_VHOST=$vhost: use letters, digits, _ . / and - only" ;; esac
[ -r "$pwfile" ] || die "cannot read the password file $pwfile (RABBITMQ_PASSWORD_FILE)"
# One line; its trailing newline is not part of it (the services drop it too).
pw= lines=0
while IFS= read -r line || [ -n "$line" ]; do
  pw=$line lines=$((lines + 1))
done <"$pwfile"
[ "$lines" -le 1 ] || die "the password file $pwfile holds more than one line"
[ -n "$pw" ] || die "the password file $pwfile is empty"
case $pw in *'"'* | *'\'* | *[[:cntrl:]]*) die "the password in $pwfile holds a quote, a backslash or a control character" ;; esac

umask 077
printf '{"users":[{"name":"%s","password":"%s","tags":[]}],"vhosts":[{"name":"%s"}],"permissions":[{"user":"%s","vhost":"%s","configure":".*","write":".*","read":".*"}]}\n' \
  "$user" "$pw" "$vhost" "$user" "$vhost" >"$defs"
unset pw
exec rabbitmq-server "$@"
