# pids.sh - process helpers shared by start_cluster.sh and stop_cluster.sh (sourced; needs log()).
# Daemons are found only through the PID files this cluster wrote, never by name.

proc_alive() {  # proc_alive PID [COMM]: process exists, is not a zombie (and has that command name)
    [ -n "${1:-}" ] && [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null || return 1
    [ -z "${2:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
pid_alive() {   # pid_alive PIDFILE COMM
    local p
    p=$(cat "$1" 2>/dev/null) || return 1
    proc_alive "$p" "$2"
}
stop_pidfile() { # stop_pidfile FILE COMM: SIGTERM that one PID, wait up to 30 s, then SIGKILL
    local f=$1 comm=$2 p i
    [ -e "$f" ] || return 0
    p=$(cat "$f" 2>/dev/null)
    if proc_alive "$p" "$comm"; then
        log "stopping $comm PID $p"
        kill -TERM "$p" 2>/dev/null || true
        for i in $(seq 150); do proc_alive "$p" || break; sleep 0.2; done
        if proc_alive "$p"; then log "PID $p ignored SIGTERM, sending SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
    fi
    rm -f "$f"
}
