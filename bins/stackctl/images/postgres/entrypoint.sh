#!/bin/sh
# Entrypoint of localhost/taskstack-postgres (made by `stackctl build
# --postgres`; run by dash, copied from the build host, because initdb starts
# its helper processes through /bin/sh anyway). It takes the variable names
# of the official postgres image:
#   PGDATA                  the cluster, on the volume (initdb'ed when empty)
#   POSTGRES_USER           the role the services log in as (not a superuser)
#   POSTGRES_DB             its database, owned by it
#   POSTGRES_PASSWORD_FILE  the role's password (a compose secret)
# On every start the role's password is set from the file (single-user
# mode, before the server listens), so rotating it is: write the new secret,
# recreate the container, restart the services. The superuser `postgres` has
# no password: it logs in only through the socket in /tmp as the container's
# own user (peer), e.g. `docker exec <container> psql -U postgres`.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-taskstack}
db=${POSTGRES_DB:-taskstack}
pwfile=${POSTGRES_PASSWORD_FILE:-/run/secrets/postgres_password}
export PGDATA

die() {
  echo "taskstack-postgres: $*" >&2
  exit 2
}

case $user in '' | *[!a-z0-9_]*) die "POSTGRES_USER=$user: use lower-case letters, digits and _ only" ;; esac
case $db in '' | *[!a-z0-9_]*) die "POSTGRES_DB=$db: use lower-case letters, digits and _ only" ;; esac
[ "$user" != postgres ] || die "POSTGRES_USER=postgres: the services' role must not be the superuser"
[ -r "$pwfile" ] || die "cannot read the password file $pwfile (POSTGRES_PASSWORD_FILE)"
# One line; its trailing newline is not part of it (the services drop it too).
pw= lines=0
while IFS= read -r line || [ -n "$line" ]; do
  pw=$line lines=$((lines + 1))
done <"$pwfile"
[ "$lines" -le 1 ] || die "the password file $pwfile holds more than one line"
[ -n "$pw" ] || die "the password file $pwfile is empty"
case $pw in *"'"*) die "the password in $pwfile holds a quote" ;; esac

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "taskstack-postgres: initializing $PGDATA (database $db, role $user)" >&2
  initdb --username=postgres --encoding=UTF8 --no-locale \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  # The services reach the server over the compose network only (samenet:
  # the subnets this container is attached to).
  echo "host $db $user samenet scram-sha-256" >>"$PGDATA/pg_hba.conf"
  postgres --single -D "$PGDATA" postgres >/dev/null <<SQL
CREATE ROLE "$user" LOGIN
CREATE DATABASE "$db" OWNER "$user"
SQL
fi
postgres --single -D "$PGDATA" postgres >/dev/null <<SQL
ALTER ROLE "$user" PASSWORD '$pw'
SQL
unset pw
exec postgres -D "$PGDATA" "$@"
