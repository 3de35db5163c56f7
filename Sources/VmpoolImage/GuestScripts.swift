/// The guest's PID 1: a busybox shell script that starts the agent on the second serial port.
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
    	"$agent" "$port" </dev/null >/dev/null 2>&1
    	$bb sleep 1
    done
    """#
}
