#!/usr/bin/env bash
# Runs a command in a private network namespace with only loopback up. As root this is a plain
# network namespace; as an unprivileged user a user namespace maps us to root inside it.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then
  exec unshare --net -- sh -c 'ip link set lo up && exec "$@"' netns "$@"
else
  exec unshare --net --map-root-user -- sh -c 'ip link set lo up && exec "$@"' netns "$@"
fi
