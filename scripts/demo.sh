#!/usr/bin/env bash
# Install qblock, then run the main job: a short traced API demo on a scratch image, and the
# storage daemon serving a scratch qcow2 with seed 000's -blockdev lines and a QMP socket.
# Talk to it from another terminal with the commands it prints; Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
top=$PWD
dir=${QBLOCK_DEMO_DIR:-$(mktemp -d /tmp/qblock-demo-XXXXXX)}
"$top/.venv/bin/qblock" demo --dir "$dir"
cd "$dir"
[ -e test01.qcow2 ] || "$top/.venv/bin/qblock" img create -f qcow2 test01.qcow2 1G
cat <<MSG

qblock daemon: drive01 (qcow2) -> file01 (file) on $dir/test01.qcow2
QMP socket:    $dir/qmp.sock
  $top/.venv/bin/qmp-shell $dir/qmp.sock            (then: query-named-block-nodes)
  $top/.venv/bin/qblock ctl graph --socket $dir/qmp.sock
  $top/.venv/bin/qblock ctl domblkinfo drive01 --socket $dir/qmp.sock
Ctrl-C stops the daemon (images flushed and closed).
MSG
exec "$top/.venv/bin/qblock" daemon \
    --blockdev node-name=file01,driver=file,aio=threads,filename=test01.qcow2,cache.direct=on,cache.no-flush=off \
    --blockdev node-name=drive01,driver=qcow2,cache.direct=on,cache.no-flush=off,file=file01 \
    --chardev socket,path=qmp.sock,server=on,wait=off,id=mon0 \
    --monitor chardev=mon0 "$@"
