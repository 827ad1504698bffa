#!/bin/sh
# Keeps this pod's AllegroGraph a member of the multi-master replication
# cluster of $STACK_REPOSITORY, under the pod's name, and takes it out when
# the pod goes. Membership has to follow the pod's life (an AllegroGraph
# container that restarts empty must join again, a pod scaled away must
# leave), which stack, run once from outside, does not see; so this runs in
# the pod, in a curlimages/curl sidecar, as the franzinc/agraph image has no
# curl. A member, not the controlling instance: with STACK_SELF equal to
# STACK_CONTROLLING it does nothing.
#
# Env: AGRAPH_SUPER_USER, AGRAPH_SUPER_PASSWORD, POD_NAME, STACK_REPOSITORY,
# STACK_CONTROLLING (host of the controlling instance), STACK_SELF (this
# pod's DNS name), STACK_PORT (10035), STACK_JOIN_SECONDS (default 900),
# STACK_CHECK_SECONDS (default 10; tests make it shorter).
# Not joined by the deadline: exit 1, and Kubernetes restarts the container.
# The password never goes on a command line (ps would show it): curl reads
# it from a config on stdin (-K -).
set -u
PORT=${STACK_PORT:-10035}
JOIN_SECONDS=${STACK_JOIN_SECONDS:-900}
CHECK_SECONDS=${STACK_CHECK_SECONDS:-10}
SELF="http://$STACK_SELF:$PORT"
REPL="http://$STACK_CONTROLLING:$PORT/repositories/$STACK_REPOSITORY/repl"
TMP=$(mktemp 2>/dev/null || echo "/tmp/allegrograph-member.$$")

log() { echo "allegrograph-member $POD_NAME: $*"; }

# A value for a curl config line: backslashes and double quotes escaped.
quoted() { printf '%s' "$1" | sed 's/[\\"]/\\&/g'; }

# ag SECONDS [--password] CURL-ARGS...: one request as the super-user, the
# body on stdout, failing on HTTP errors. --password also sends the password
# as the query value `password` (with -G). Run in the background and waited
# for, so that a TERM is handled at once.
ag() {
  t=$1; shift
  pw=
  if [ "${1:-}" = --password ]; then pw=1; shift; fi
  {
    printf 'user = "%s:%s"\n' "$(quoted "$AGRAPH_SUPER_USER")" "$(quoted "$AGRAPH_SUPER_PASSWORD")"
    [ -n "$pw" ] && printf 'data-urlencode = "password=%s"\n' "$(quoted "$AGRAPH_SUPER_PASSWORD")"
  } | curl -K - -sS --fail-with-body --max-time "$t" "$@" &
  wait $!
}

# The HTTP status of a GET of the repository's size on this pod's
# AllegroGraph (000 when it did not answer): 404 alone means it is gone.
held() {
  {
    printf 'user = "%s:%s"\n' "$(quoted "$AGRAPH_SUPER_USER")" "$(quoted "$AGRAPH_SUPER_PASSWORD")"
  } | curl -K - -sS -o /dev/null -w '%{http_code}' --max-time 10 \
      "$SELF/repositories/$STACK_REPOSITORY/size" 2>/dev/null &
  wait $!
}

# $TMP as logged: an answer that echoes the request shows no password.
answer() { sed 's/password=[^&[:space:]"]*/password=***/g' "$TMP"; }

# PUT .../repl/remove?instanceName=$POD_NAME on the controlling instance.
remove() {
  ag "$1" -X PUT -G --data-urlencode "instanceName=$POD_NAME" "$REPL/remove" >"$TMP" 2>&1 \
    && log "removed from the cluster" || log "remove: $(answer)"
}

leave() {
  trap '' TERM INT
  [ -n "${sleeper:-}" ] && kill "$sleeper" 2>/dev/null
  if [ "$STACK_SELF" != "$STACK_CONTROLLING" ]; then remove 20; fi
  rm -f "$TMP"
  exit 0
}
trap leave TERM INT

# Sleep, interruptible by TERM.
pause() { sleep "$1" & sleeper=$!; wait $sleeper; sleeper=; }

# Back off before the next attempt; exit 1 at the deadline.
backoff() {
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "not a member after ${JOIN_SECONDS}s, giving up"; rm -f "$TMP"; exit 1
  fi
  pause "$delay"
  delay=$((delay * 2)); [ "$delay" -gt 30 ] && delay=30
}

# Is this pod's instance listed by the controlling instance ($TMP holds
# repl/status)? Only as a JSON string "POD_NAME", whatever the shape.
listed() { grep -q "\"$POD_NAME\"" "$TMP"; }

join() {
  deadline=$(( $(date +%s) + JOIN_SECONDS )); delay=1
  until ag 5 "$SELF/version" >/dev/null 2>&1; do backoff; done
  while :; do
    if ag 10 "$REPL/status" >"$TMP" 2>&1; then
      here=$(held)
      if [ "$here" = 200 ]; then
        listed && { log "a member already"; return; }
        # A copy left standalone by an earlier remove: growCluster needs the name free.
        log "deleting the repository left here by an earlier remove"
        ag 60 -X DELETE "$SELF/repositories/$STACK_REPOSITORY" >/dev/null || { backoff; continue; }
      elif [ "$here" != 404 ]; then
        # This pod's AllegroGraph did not say: no reason to leave the cluster.
        log "the repository here answered $here; trying again"; backoff; continue
      fi
      # Perhaps listed under this name from an earlier life (the container came
      # back empty): out first. Not a member: an error, and that is fine.
      remove 20
      if ag 600 --password -X PUT -G --data-urlencode "host=$STACK_SELF" --data-urlencode "port=$PORT" \
          --data-urlencode "name=$STACK_REPOSITORY" --data-urlencode "user=$AGRAPH_SUPER_USER" \
          --data-urlencode "instanceName=$POD_NAME" "$REPL/growCluster" >"$TMP" 2>&1; then
        log "joined the cluster"; return
      fi
      log "growCluster: $(answer)"
    else
      log "waiting for the cluster: $(answer)"
    fi
    backoff
  done
}

if [ "$STACK_SELF" = "$STACK_CONTROLLING" ]; then
  log "the controlling instance; nothing to join"
  while :; do pause 3600; done
fi

join
# Every $CHECK_SECONDS s: does this pod's AllegroGraph still hold the
# repository (a restarted container comes back empty), and does the
# controlling instance still list this pod (a cluster made again after the
# controlling instance lost its volumes does not)? If not, join again. A
# controlling instance that does not answer is no reason to.
while :; do
  pause "$CHECK_SECONDS"
  if [ "$(held)" = 404 ]; then
    log "the repository is gone here; joining again"; join
  elif ag 10 "$REPL/status" >"$TMP" 2>&1 && ! listed; then
    log "the cluster does not list this pod; joining again"; join
  fi
done
