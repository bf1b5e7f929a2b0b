#!/bin/sh
# The rig's command agent in L2, on ttyS1 (stdin and stdout). Framing: rig/src/agent.rs.
#
# Each command runs as `sh -c` in its own session and process group, with stdin from
# /dev/null and cwd /work. Background processes it starts (`daemon &`, or
# `setsid daemon &`) survive into later commands; redirect their output to a file, or
# it will show up in the output of whatever command runs when they write. On timeout
# the watchdog SIGKILLs the command's whole process group (its background children
# included, unless they started their own session) and the agent goes on.
# Each command writes to a fresh open of the tty, so flags it sets on its stdout
# (O_NONBLOCK, as QEMU's stdio chardev does) never reach the agent's own descriptor.
#
# No child may exit while `read` waits: ash restarts `read` after a SIGCHLD and drops
# the bytes of the line it had read so far. So every child is reaped before reading.
# The agent's own stderr (e.g. ash's "Killed" job notices) is discarded.
stty raw -echo
exec 2>/dev/null
printf '@@rig-ready kvm=%s npt=%s@@\n' "$RIG_KVM" "$RIG_NPT"
while IFS= read -r line; do
	nonce=${line%% *}
	rest=${line#* }
	secs=${rest%% *}
	script=$(printf '%s' "${rest#* }" | base64 -d)
	cd /work
	setsid sh -c "$script" </dev/null >/dev/ttyS1 2>&1 &
	pid=$!
	setsid sh -c "sleep $secs; touch /run/rig-timeout.$nonce; kill -KILL -$pid" \
		</dev/null >/dev/null 2>&1 &
	dog=$!
	wait "$pid"
	status=$?
	# By pid too: the watchdog may not have called setsid yet.
	kill -KILL -"$dog" "$dog"
	wait "$dog"
	timed_out=0
	if [ -e "/run/rig-timeout.$nonce" ]; then
		timed_out=1
		rm -f "/run/rig-timeout.$nonce"
	fi
	printf '\n@@rig-end %s %s %s@@\n' "$nonce" "$status" "$timed_out"
done
