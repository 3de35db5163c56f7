/// The guest side of vmpool: `/init` (PID 1) and the agent it runs on the second serial port.
enum GuestScripts {
    /// Mounts /proc, /sys and /dev, then runs the agent on /dev/ttyS1 forever.
    static let initScript = #"""
    #!/bin/busybox sh
    # vmpool guest init (PID 1).
    #
    # Mounts the pseudo file systems, then runs the guest agent on the second
    # serial port (/dev/ttyS1) in a respawning loop. The console (ttyS0) only
    # ever sees one "vmpool-guest: ready" line. PID 1 never exits.
    
    PATH=/bin:/sbin:/usr/bin:/usr/sbin
    export PATH
    bb=/bin/busybox
    
    $bb mount -t proc proc /proc 2>/dev/null
    $bb mount -t sysfs sysfs /sys 2>/dev/null
    $bb mount -t devtmpfs devtmpfs /dev 2>/dev/null
    
    # Applet links are normally in the image; create them if they are not.
    [ -e /bin/stty ] || $bb --install -s 2>/dev/null
    
    # Keep kernel messages off the console from here on.
    echo 1 >/proc/sys/kernel/printk 2>/dev/null
    
    agent=/bin/vmpool-agent
    port=/dev/ttyS1
    
    echo "vmpool-guest: ready" >/dev/console 2>/dev/null
    while :; do
    	$bb sh "$agent" "$port" </dev/null >/dev/null 2>&1
    	$bb sleep 1
    done
    """#

    /// Line protocol `ID COMMAND [ARGS]` -> `ID ok [DATA]` / `ID error MESSAGE` over /dev/ttyS1.
    static let agentScript = #"""
    #!/bin/busybox sh
    # vmpool guest agent.
    #
    # Line protocol on a serial port (default /dev/ttyS1):
    #   request:  ID COMMAND [ARGS...]
    #   response: ID ok [DATA]   or   ID error MESSAGE
    # Commands:
    #   ping                 -> ID ok pong
    #   info                 -> ID ok cpus=N memMiB=M
    #   online               -> online every offline CPU and memory block, then
    #                           answer like info
    #   time EPOCH[.FRAC]    -> set the guest clock
    #   seed HEX             -> mix the decoded bytes into /dev/urandom
    #
    # The hot path (reading a request, ping, info) uses shell builtins only.
    
    port=${1:-/dev/ttyS1}
    exec 0<>"$port" 1>&0 2>/dev/null || exit 1
    # Raw, no echo. The emulated UART paces its receive FIFO timeout by the baud
    # rate; 115200 makes a 140-byte seed request arrive about twice as fast as
    # the 9600 default.
    stty raw -echo -echoe -echok -echonl -icrnl -onlcr 115200 2>/dev/null
    
    cr=$(printf '\r')
    tab=$(printf '\t')
    ifs=" $tab$cr"
    tpid=
    
    cpus=0
    mem_mib=0
    
    count() {
    	# Online CPUs from /sys/devices/system/cpu/online ("0-2,4").
    	cpus=0
    	list=
    	read -r list </sys/devices/system/cpu/online
    	IFS=,
    	for r in $list; do
    		case $r in
    		*-*) cpus=$((cpus + ${r#*-} - ${r%-*} + 1)) ;;
    		?*) cpus=$((cpus + 1)) ;;
    		esac
    	done
    	IFS=$ifs
    	mem_mib=0
    	while read -r k v _; do
    		if [ "$k" = MemTotal: ]; then
    			mem_mib=$((v / 1024))
    			break
    		fi
    	done </proc/meminfo
    }
    
    online() {
    	for f in /sys/devices/system/memory/memory*/state; do
    		[ -e "$f" ] || continue
    		s=
    		read -r s <"$f"
    		[ "$s" = offline ] && echo online >"$f"
    	done
    	for f in /sys/devices/system/cpu/cpu*/online; do
    		[ -e "$f" ] || continue
    		s=
    		read -r s <"$f"
    		[ "$s" = 0 ] && echo 1 >"$f"
    	done
    }
    
    set_time() {
    	# $1 = EPOCH[.FRACTION]. Without a fraction the clock is stepped at
    	# once. With one, a background job steps it to the next whole second
    	# exactly when that second begins, and the clock is stepped to the
    	# current whole second meanwhile, so the answer is not delayed.
    	case $1 in
    	'' | .* | *[!0-9.]* | *.*.*) return 1 ;;
    	esac
    	sec=${1%%.*}
    	sec=${sec#"${sec%%[!0]*}"}
    	sec=${sec:-0}
    	frac=
    	case $1 in *.*) frac=${1#*.} ;; esac
    	frac=${frac}000000
    	frac=${frac%"${frac#??????}"}
    	usec=$((1$frac - 1000000))
    	[ -n "$tpid" ] && kill "$tpid" 2>/dev/null
    	tpid=
    	if [ "$usec" -gt 0 ]; then
    		wait=$((1000000 - usec))
    		if [ "$wait" -lt 100000 ]; then
    			usleep "$wait"
    			date -s "@$((sec + 1))" >/dev/null 2>&1
    			return
    		fi
    		(usleep "$wait" && date -s "@$((sec + 1))") >/dev/null 2>&1 &
    		tpid=$!
    	fi
    	date -s "@$sec" >/dev/null 2>&1
    }
    
    seed() {
    	# $1 = hex string, even length.
    	h=$1
    	case $h in
    	'' | *[!0-9a-fA-F]*) return 1 ;;
    	esac
    	[ $((${#h} % 2)) -eq 0 ] || return 1
    	esc=
    	while [ -n "$h" ]; do
    		r=${h#??}
    		esc="$esc\\x${h%"$r"}"
    		h=$r
    	done
    	printf %b "$esc" >/dev/urandom
    }
    
    IFS=$ifs
    while :; do
    	id=
    	cmd=
    	a1=
    	rest=
    	read -r id cmd a1 rest || exit 1
    	[ -n "$id" ] || continue
    	case $cmd in
    	ping)
    		echo "$id ok pong"
    		;;
    	info)
    		count
    		echo "$id ok cpus=$cpus memMiB=$mem_mib"
    		;;
    	online)
    		online
    		count
    		echo "$id ok cpus=$cpus memMiB=$mem_mib"
    		;;
    	time)
    		if set_time "$a1"; then
    			echo "$id ok"
    		else
    			echo "$id error invalid time"
    		fi
    		;;
    	seed)
    		if seed "$a1"; then
    			echo "$id ok"
    		else
    			echo "$id error invalid hex"
    		fi
    		;;
    	'')
    		echo "$id error missing command"
    		;;
    	*)
    		echo "$id error unknown command"
    		;;
    	esac
    done
    """#
}
