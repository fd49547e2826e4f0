#!/usr/bin/env bash
# linkrate.sh RATE COMMAND [ARG...]
#
# On one host, loopback TCP moves bytes about as fast as memcpy, so a codec that sends fewer
# bytes cannot show what it saves on a real network. This runs COMMAND inside a private network
# namespace whose loopback is rate-limited to RATE by a token bucket (tc tbf). Every process
# COMMAND starts then talks through that one shaped link, pulls and pushes sharing it.
#
#   bash bench/peers/linkrate.sh 1gbit env TP_SOCKET_IFNAME=lo .venv/bin/python \
#       bench/peers/torch_rpc_ps.py --preset small --steps 60 --tp uv --json
#
# RATE is anything tc understands (1gbit, 10gbit, 500mbit). Needs root and iproute2.
# A 200 MiB TCP transfer through 1gbit measured 125 MB/s.
set -eu
if [ $# -lt 2 ]; then
  echo "usage: $0 RATE COMMAND [ARG...]" >&2
  exit 2
fi
rate=$1; shift
ns=shardps-link-$$
ip netns add "$ns"
trap 'ip netns delete "$ns" 2>/dev/null || true' EXIT
ip -n "$ns" link set dev lo up
# The bucket must hold more than one 64 KiB loopback packet or nothing passes; 1 MB of burst
# also keeps a short message from being charged as if the link were idle before it.
ip netns exec "$ns" tc qdisc add dev lo root tbf rate "$rate" burst 1mb latency 50ms
ip netns exec "$ns" "$@"
