#!/usr/bin/env bash
# A stand-in for ../shared/peers/vllm-cpu.sh with the same contract (start MODEL PORT, stop,
# PEER_RUN_DIR), serving fake_peer_server.py: a real process on a real socket, in seconds.
# FAKE_PEER_PYTHON: the interpreter; FAKE_PEER_FAIL=1: the server exits before it answers.
set -euo pipefail
RUN=${PEER_RUN_DIR:?}
PY=${FAKE_PEER_PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
echo "$*" >>"$RUN/calls"
case "${1:-}" in
start)
    model=${2:?model folder}; port=${3:?port}
    setsid "$PY" "$here/fake_peer_server.py" "$model" "$port" "$RUN" >"$RUN/server.log" 2>&1 </dev/null &
    echo $! >"$RUN/pid"
    for _ in $(seq 1 100); do
        if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
            echo "fake peer serving on 127.0.0.1:$port"; exit 0
        fi
        kill -0 "$(cat "$RUN/pid")" 2>/dev/null || { tail -5 "$RUN/server.log"; exit 1; }
        sleep 0.1
    done
    exit 1
    ;;
stop)
    [[ -f "$RUN/pid" ]] || exit 0
    pid=$(cat "$RUN/pid"); kill -TERM -- "-$pid" 2>/dev/null || true
    rm -f "$RUN/pid"
    ;;
*) exit 2 ;;
esac
