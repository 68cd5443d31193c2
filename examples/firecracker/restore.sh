#!/usr/bin/env bash
# Restore a Firecracker snapshot with its memory served lazily by faultline.
#
#   examples/firecracker/restore.sh VM.SNAP VM.MEM [FIRECRACKER_BINARY]
#
# Needs a firecracker binary (v1.1 or later) and a snapshot made by it (PUT /snapshot/create with
# "snapshot_type": "Full"). Starts `faultline serve` on a socket, starts Firecracker, loads the
# snapshot with the Uffd memory backend and resumes the VM. Ctrl-C stops both.
set -euo pipefail
snap=${1:?usage: restore.sh VM.SNAP VM.MEM [firecracker]}
mem=${2:?usage: restore.sh VM.SNAP VM.MEM [firecracker]}
fc=${3:-firecracker}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT

go build -o "$dir/faultline" "$(dirname "$0")/../../cmd/faultline"
"$dir/faultline" serve --socket "$dir/uffd.sock" --mem-file "$mem" &
"$fc" --api-sock "$dir/fc.sock" &
for _ in $(seq 100); do [ -S "$dir/fc.sock" ] && [ -S "$dir/uffd.sock" ] && break; sleep 0.05; done

curl --fail --silent --show-error --unix-socket "$dir/fc.sock" -X PUT http://localhost/snapshot/load \
  -H 'Content-Type: application/json' -d @- <<JSON
{
  "snapshot_path": "$snap",
  "mem_backend": {"backend_type": "Uffd", "backend_path": "$dir/uffd.sock"},
  "enable_diff_snapshots": false,
  "resume_vm": true
}
JSON
echo "VM restored; its memory is served by faultline (pid $(jobs -p | head -1)). Ctrl-C to stop."
wait
