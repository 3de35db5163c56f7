// vmpool guest agent: serves the host on the VM's virtio-serial ports.
//
// Ports. The agent finds its ports by name in /sys/class/virtio-ports: org.vmpool.ctl
// for control requests and org.vmpool.exec.N for commands (the host takes a free one per
// `vmpool exec`). Every port is an independent session; any frame is accepted on any port.
// With no host connected, virtio_console reports POLLHUP continuously, so such a port is left
// out of the poll set and watched through SIGIO (O_ASYNC), which the driver raises on every
// host connect and disconnect and on arriving data. The ports are found again on uevents
// (and every 500 ms until the control port exists: virtio_console may load after the agent).
//
// Session boundaries. The driver exposes only whether a host is connected now, and delivers
// the host's connect and disconnect notices on another virtqueue than data, handled later:
// the first frames of a new host may be here before the notice that the previous host left,
// or both notices may be handled before the agent looks (it then sees no disconnect at all).
// A port can therefore be used two ways:
//  - In-band sessions (what vmpool's exec does): the host opens every session with an H
//    frame carrying a random token. The H ends whatever the port ran before (its command is
//    killed, its undelivered output dropped) and is echoed; the host discards everything it
//    receives before the echo (the tail of an older session's output). A session ends
//    in-band when X has been sent, or at the next H. Notices then only serve to find a host
//    that vanished in the middle of a session: when the port shows no host connected and no
//    byte arrives for --host-gone-ms (default 3000; hosts send P frames every second while
//    they wait), the session's command is killed and its output dropped; if the host was cut
//    in the middle of a frame, input is skipped up to the next H frame. A stale disconnect
//    notice of an older connection never ends a session that is still sending.
//  - Without an H frame (the control port, older hosts), a host connection starts a
//    session and a host disconnect ends it: the command running on the port is killed (its
//    whole process group, SIGKILL), buffers are dropped and the frame parser restarts, and
//    whole frames that arrived before the disconnect showed are kept for the next session
//    (see settle). A host that reuses such a port at once may find its frames taken by the
//    older session.
//
// Testing mode: `vmpool-agent --fd NAME=N ... [--notices FD] [--host-gone-ms MS]` serves
// already open descriptors (socket pairs) instead; EOF on one ends its session for good, and
// the agent exits once every descriptor has ended. Lines `NAME down` and `NAME up` on the
// --notices descriptor stand for the driver's disconnect and connect notices of port NAME.
//
// Frames, both directions: 1 byte type, 4 bytes big-endian payload length, payload.
// The agent refuses payloads above 1 MiB from the host (answer `A` "0 error frame too
// large", then input is ignored until the session ends, or in an in-band session up to the
// next H frame) and sends at most 64 KiB per frame.
//
// Host to guest:
//   H  session start: a token of 8 to 64 characters [0-9A-Za-z_-]; answered by H with the same
//      token after the port's earlier session was ended (see Session boundaries)
//   P  the host is still there: no answer (sent every second while a host waits)
//   Q  control request, text `ID COMMAND [ARGS...]`, answered by A `ID ok [DATA]` or
//      `ID error MESSAGE`:
//        ping                      -> ok pong
//        info                      -> ok cpus=N memMiB=M time=SEC.USEC (online CPUs and memory)
//        online                    -> online every offline memory block and CPU, then as info
//        time SEC[.FRAC]           -> set CLOCK_REALTIME
//        seed HEX                  -> add the bytes to the kernel RNG, credited as entropy
//        hello [time=SEC.FRAC] [seed=HEX] [name=HOSTNAME] [machine=32HEX]
//              [net=IFACE,MAC,ADDR/PREFIX,GATEWAY|-]
//                                  -> all validated first, then applied in that order; ok pong
//                                     (the older positional form `hello SEC.FRAC HEX` still works)
//   C  run a command: entries of one tag byte and a NUL-terminated string: `a` argv element
//      (at least one), `e` KEY=VALUE environment, `d` working directory, `t` ROWSxCOLS for a
//      pty, `i` 1 to forward stdin (otherwise stdin is /dev/null). The environment starts
//      from PATH and HOME, with the image's Env over them (IMAGE_CONFIG), and the directory
//      is the image's WorkingDir, else /. Answered by S (the pid)
//      once the command runs, or X `error 127|126|125 MESSAGE` when it cannot. Under TCG
//      the command starts with ADDR_NO_RANDOMIZE unless its environment has VMPOOL_ASLR=1.
//   I  stdin bytes for the running command; an empty I closes its stdin (sends EOF on a pty)
//   K  signal number: kill(-pgid, sig)
//   W  ROWSxCOLS: resize the pty
// Guest to host:
//   H echo of the host's H, A answer, S started (pid), O stdout, E stderr, X exit (`exit N`,
//   `signal N` or `error CODE MESSAGE`). All O and E bytes precede X; X comes once the
//   command has exited and both of its output pipes reached EOF.
//
// One process, one poll() loop, every descriptor non-blocking. Memory is bounded: per port a
// 64 KiB input buffer, a 256 KiB output ring and at most one pending frame of up to 1 MiB;
// command output is read only while its port's ring has room, and a port is read only while
// its command's stdin pipe accepts data. No fork for control requests.
//
// Build: gcc -static -Os -s -o vmpool-agent vmpool-agent.c
#define _GNU_SOURCE
#include <arpa/inet.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/ethernet.h>
#include <net/if_arp.h>
#include <netpacket/packet.h>
#include <linux/magic.h>
#include <linux/netlink.h>
#include <linux/random.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define FRAME_HEADER 5
#define MAX_IN_PAYLOAD (1u << 20)      // largest frame accepted from the host
#define MAX_OUT_PAYLOAD (64u << 10)    // largest frame sent to the host
#define IN_SIZE (64u << 10)            // per port input buffer
#define OUT_SIZE (256u << 10)          // per port output ring (power of two)
#define OUT_RESERVE (16u << 10)        // ring space kept for answers, S and X frames
#define ANSWER_MAX 4000                // longest A payload
#define MIN_READ 4096                  // read command output only with this much room
#define MAX_PORTS 64
#define PIPE_SIZE (1 << 20)            // requested size of a command's output pipes
#define TOKEN_MIN 8                    // an H frame's token: 8 to 64 characters [0-9A-Za-z_-]
#define TOKEN_MAX 64

static const char *const default_env[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
};

// A root disk vmpool made from an image (image build --from) carries the image's defaults for
// commands in this file: lines `env KEY=VALUE` and `workdir PATH` (and `user NAME`, not used:
// commands run as root, as on every vmpool guest).
#define IMAGE_CONFIG "/.vmpool/image-config"
#define IMAGE_ENV_MAX 256
// Where the initramfs put its busybox (and this agent) for a root disk without an agent of its
// own; the applets come last on the default PATH, so that `cp` (sh and tar) works on any image.
#define CARRIED_BUSYBOX "/.vmpool/guest/bin/busybox"
#define CARRIED_PATH ":/.vmpool/guest/bin:/.vmpool/guest/sbin:/.vmpool/guest/usr/bin:/.vmpool/guest/usr/sbin"

// The environment and working directory a command starts with unless the host says otherwise.
static char *base_env[IMAGE_ENV_MAX + 4];
static size_t nbase;
static const char *base_cwd = "/";
static int base_cwd_from_image;

enum { PORT_IDLE, PORT_ACTIVE, PORT_DEAD };
enum { BLOCK_NONE, BLOCK_STDIN, BLOCK_OUTPUT };
enum { PHASE_HEADER, PHASE_CHECK, PHASE_PAYLOAD };

struct job {
    pid_t pid;
    int status_fd;   // exec status pipe, until EOF
    int out_fd;      // stdout pipe, or the pty master
    int err_fd;      // stderr pipe; -1 with a pty
    int in_fd;       // stdin pipe, or a duplicate of the pty master; -1 when closed
    int pty;
    int exec_ok;     // the status pipe reached EOF without an error: the command runs
    int started;     // S sent
    int exited;
    int status;      // wait status once exited
    int fail_code;   // 126/127 when the command could not run
    char fail_msg[300];
    char argv0[128]; // for messages
    char cwd[128];
};

struct port {
    char name[64];   // "ctl", "exec.0", or the name given with --fd
    char dev[256];   // sysfs entry (vport1p1); empty in testing mode
    int fd;
    int state;
    int seen;        // set by the last scan
    // input
    unsigned char *in;
    size_t in_start, in_end;
    int phase;
    unsigned char hdr[FRAME_HEADER];
    size_t hdr_len;            // header bytes read so far
    unsigned char type;
    uint32_t len, got;         // current frame's payload length and bytes consumed
    unsigned char *payload;    // payload of a non-I frame being collected
    int discard;               // an oversized frame was refused: ignore input
    size_t carry;              // input kept at the start of `in` for the next session
    int blocked;
    // in-band sessions (H frames)
    int inband;                // an H frame came: sessions begin and end in-band from now on
    int resync;                // skipping input up to the next H frame (a stream cut short)
    int hup;                   // in-band: the port shows no host connected (scan mode: not polled)
    long long quiet_since;     // in-band, hup: ms (CLOCK_MONOTONIC) since which nothing came
    // output ring
    unsigned char *out;
    size_t out_head, out_tail; // free-running counters
    struct job *job;
};

static struct port *ports[MAX_PORTS];
static int nports;
static int testing;            // serving --fd descriptors
static int fixed_layout;       // commands start without address-space randomization (TCG)
static int sig_fd = -1;
static int uevent_fd = -1;
static int have_ctl;           // the control port was found (scan mode)
static int idle_changed;       // a virtio port went idle: check whether a host is back
static int notice_fd = -1;     // testing mode: lines `NAME down|up` standing for the notices
static long long host_gone_ms = 3000; // in-band: a silent, disconnected host is gone after this

// ---------------------------------------------------------------------------------------------
// Small helpers

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static void close_fd(int *fd) {
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_nonblock(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static int read_small(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n;
    do n = read(fd, buf, size - 1);
    while (n < 0 && errno == EINTR);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return (int)n;
}

static int write_small(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n < 0 ? -1 : 0;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// "ROWSxCOLS", each 1..65535.
static int parse_size(const char *text, unsigned short *rows, unsigned short *cols) {
    char *end;
    if (!text || !isdigit((unsigned char)*text)) return -1;
    errno = 0;
    unsigned long r = strtoul(text, &end, 10);
    if (errno || *end != 'x' || !isdigit((unsigned char)end[1])) return -1;
    unsigned long c = strtoul(end + 1, &end, 10);
    if (errno || *end || r < 1 || r > 65535 || c < 1 || c > 65535) return -1;
    *rows = (unsigned short)r;
    *cols = (unsigned short)c;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Output ring

static size_t out_used(const struct port *p) { return p->out_tail - p->out_head; }
static size_t out_free(const struct port *p) { return OUT_SIZE - out_used(p); }

static void out_put(struct port *p, const void *data, size_t len) {
    const unsigned char *src = data;
    while (len > 0) {
        size_t at = p->out_tail & (OUT_SIZE - 1);
        size_t n = OUT_SIZE - at < len ? OUT_SIZE - at : len;
        memcpy(p->out + at, src, n);
        p->out_tail += n;
        src += n;
        len -= n;
    }
}

// Queues one frame; the caller made sure the ring has room.
static void out_frame(struct port *p, unsigned char type, const void *data, size_t len) {
    unsigned char h[FRAME_HEADER];
    h[0] = type;
    put32(h + 1, (uint32_t)len);
    out_put(p, h, sizeof h);
    out_put(p, data, len);
}

// Describes `len` bytes of the ring from counter `from` as at most two segments.
static int ring_iov(const struct port *p, size_t from, size_t len, struct iovec iov[2]) {
    size_t at = from & (OUT_SIZE - 1);
    size_t first = OUT_SIZE - at < len ? OUT_SIZE - at : len;
    iov[0].iov_base = p->out + at;
    iov[0].iov_len = first;
    if (first == len) return 1;
    iov[1].iov_base = p->out;
    iov[1].iov_len = len - first;
    return 2;
}

// ---------------------------------------------------------------------------------------------
// Answers

static void answer(struct port *p, const char *id, const char *status, const char *data) {
    char text[ANSWER_MAX + 1];
    int n = snprintf(text, sizeof text, "%s %s%s%s", id, status, data && *data ? " " : "", data ? data : "");
    if (n < 0) return;
    if (n > ANSWER_MAX) n = ANSWER_MAX;
    out_frame(p, 'A', text, (size_t)n);
}

static void exit_error(struct port *p, int code, const char *message) {
    char text[320];
    int n = snprintf(text, sizeof text, "error %d %s", code, message);
    if (n < 0) return;
    if (n >= (int)sizeof text) n = sizeof text - 1;
    out_frame(p, 'X', text, (size_t)n);
}

// ---------------------------------------------------------------------------------------------
// Guest facts and settings

// Online CPUs from a list like "0-2,4".
static int online_cpus(void) {
    char buf[1024];
    if (read_small("/sys/devices/system/cpu/online", buf, sizeof buf) < 0) return -1;
    int count = 0;
    char *save = NULL;
    for (char *part = strtok_r(buf, ",\n", &save); part; part = strtok_r(NULL, ",\n", &save)) {
        char *dash = strchr(part, '-');
        count += dash ? atoi(dash + 1) - atoi(part) + 1 : 1;
    }
    return count;
}

static long mem_total_mib(void) {
    char buf[4096];
    if (read_small("/proc/meminfo", buf, sizeof buf) < 0) return -1;
    char *line = strstr(buf, "MemTotal:");
    return line ? strtol(line + 9, NULL, 10) / 1024 : -1;
}

// Online memory: online blocks times the block size; MemTotal where memory blocks are not
// exposed.
static long online_mem_mib(void) {
    char buf[64];
    if (read_small("/sys/devices/system/memory/block_size_bytes", buf, sizeof buf) < 0) return mem_total_mib();
    unsigned long long block = strtoull(buf, NULL, 16);
    DIR *d = opendir("/sys/devices/system/memory");
    if (!d || block == 0) {
        if (d) closedir(d);
        return mem_total_mib();
    }
    unsigned long long blocks = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "memory", 6) != 0 || !isdigit((unsigned char)e->d_name[6])) continue;
        char path[300], state[32];
        snprintf(path, sizeof path, "/sys/devices/system/memory/%s/state", e->d_name);
        if (read_small(path, state, sizeof state) < 0) continue;
        if (strncmp(state, "online", 6) == 0) blocks++;
    }
    closedir(d);
    return (long)(blocks * block / (1024 * 1024));
}

static void info(struct port *p, const char *id) {
    char data[128];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(data, sizeof data, "cpus=%d memMiB=%ld time=%lld.%06ld", online_cpus(), online_mem_mib(),
             (long long)now.tv_sec, now.tv_nsec / 1000);
    answer(p, id, "ok", data);
}

// Writes `value` to `<dir>/<entry>/<file>` for every entry `<prefix><digits>` whose file
// reads `offline`.
static void online_all(const char *dir, const char *prefix, const char *file, const char *offline,
                       const char *value) {
    DIR *d = opendir(dir);
    if (!d) return;
    size_t plen = strlen(prefix);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, plen) != 0 || !isdigit((unsigned char)e->d_name[plen])) continue;
        char path[512], state[64];
        snprintf(path, sizeof path, "%s/%s/%s", dir, e->d_name, file);
        if (read_small(path, state, sizeof state) < 0) continue;
        state[strcspn(state, "\n")] = 0;
        if (strcmp(state, offline) == 0) write_small(path, value);
    }
    closedir(d);
}

// SEC[.FRAC], digits only.
static int parse_time(const char *text, struct timespec *ts) {
    if (!text || !isdigit((unsigned char)*text)) return -1;
    char *end = NULL;
    errno = 0;
    long long sec = strtoll(text, &end, 10);
    if (errno || sec < 0) return -1;
    long nsec = 0;
    if (*end == '.') {
        long scale = 100000000;
        const char *q = end + 1;
        for (; isdigit((unsigned char)*q); q++, scale /= 10)
            if (scale > 0) nsec += (*q - '0') * scale;
        if (*q) return -1;
    } else if (*end) {
        return -1;
    }
    if ((long long)(time_t)sec != sec) return -1;
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = nsec;
    return 0;
}

static int valid_hex(const char *hex) {
    size_t len = hex ? strlen(hex) : 0;
    if (len == 0 || len % 2 || len > 1024) return 0;
    for (size_t i = 0; i < len; i++)
        if (hexval(hex[i]) < 0) return 0;
    return 1;
}

// Adds host entropy to the kernel RNG, credited; falls back to mixing it in uncredited.
static int seed(const char *hex) {
    if (!valid_hex(hex)) return -1;
    struct {
        struct rand_pool_info info;
        unsigned char bytes[512];
    } pool;
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) pool.bytes[i] = (unsigned char)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
    pool.info.entropy_count = (int)(n * 8);
    pool.info.buf_size = (int)n;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ioctl(fd, RNDADDENTROPY, &pool.info);
    if (rc != 0) rc = write(fd, pool.bytes, n) == (ssize_t)n ? 0 : -1;
    close(fd);
    return rc;
}

// ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$
static int valid_hostname(const char *name) {
    size_t len = strlen(name);
    if (len < 1 || len > 63) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && !(c == '-' && i > 0 && i < len - 1)) return 0;
    }
    return 1;
}

static int valid_machine_id(const char *id) {
    if (strlen(id) != 32) return 0;
    for (int i = 0; i < 32; i++)
        if (hexval(id[i]) < 0) return 0;
    return 1;
}

// Whether `path` is a mount point of its own (a bind-mounted file): on another device than
// its directory.
static int mount_point(const char *path) {
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash) return 0;
    if (slash == dir) slash[1] = 0;
    else *slash = 0;
    struct stat st, parent;
    return stat(path, &st) == 0 && stat(dir, &parent) == 0 && st.st_dev != parent.st_dev;
}

// Writes `text` to `path` through a temporary file and rename(); in place where `path` is a
// mount point (a bind-mounted machine-id, or the copies in /run, see identity_on_tmpfs).
static int replace_file(const char *path, const char *text, mode_t mode) {
    size_t len = strlen(text);
    int fd;
    if (!mount_point(path)) {
        char tmp[PATH_MAX];
        snprintf(tmp, sizeof tmp, "%s.vmpool-tmp", path);
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
        if (fd < 0) return -1;
        // No fdatasync: the rename is what makes the replacement atomic, and a VM's disk does
        // not outlive the VM (a crash loses the VM, not just the file); a flush here costs a
        // clone a journal commit while it should be answering.
        int ok = write(fd, text, len) == (ssize_t)len;
        int e = errno;
        close(fd);
        if (ok) {
            if (rename(tmp, path) == 0) return 0;
            e = errno;
        }
        unlink(tmp);
        errno = e;
        if (!ok || e != EBUSY) return -1;
    }
    fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write(fd, text, len) == (ssize_t)len ? 0 : -1;
    close(fd);
    return rc;
}

static int set_hostname(const char *name, char *err, size_t errlen) {
    if (sethostname(name, strlen(name)) != 0) {
        snprintf(err, errlen, "cannot set the hostname: %s", strerror(errno));
        return -1;
    }
    if (access("/etc/hostname", W_OK) == 0) {
        char line[80];
        snprintf(line, sizeof line, "%s\n", name);
        int fd = open("/etc/hostname", O_WRONLY | O_TRUNC | O_CLOEXEC);
        int ok = fd >= 0 && write(fd, line, strlen(line)) == (ssize_t)strlen(line);
        int e = errno;
        if (fd >= 0) close(fd);
        if (!ok) {
            snprintf(err, errlen, "cannot write /etc/hostname: %s", strerror(e));
            return -1;
        }
    }
    return 0;
}

static int set_machine_id(const char *id, char *err, size_t errlen) {
    if (access("/etc/machine-id", F_OK) != 0) return 0;
    char text[34];
    for (int i = 0; i < 32; i++) text[i] = (char)tolower((unsigned char)id[i]);
    text[32] = '\n';
    text[33] = 0;
    if (replace_file("/etc/machine-id", text, 0444) != 0) {
        snprintf(err, errlen, "cannot write /etc/machine-id: %s", strerror(errno));
        return -1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Network configuration over rtnetlink: IFACE,MAC,ADDR/PREFIX,GATEWAY|-

struct netconf {
    char iface[IF_NAMESIZE];
    unsigned char mac[6];
    struct in_addr addr, gateway;
    int prefix;
    int has_address;  // ADDR/PREFIX given; `-` brings the link up with no address (a template)
    int has_gateway;
};

static int parse_net(const char *text, struct netconf *nc) {
    char buf[160];
    if (strlen(text) >= sizeof buf) return -1;
    strcpy(buf, text);
    char *fields[4];
    char *s = buf;
    for (int i = 0; i < 4; i++) {
        fields[i] = s;
        char *comma = strchr(s, ',');
        if (i < 3) {
            if (!comma) return -1;
            *comma = 0;
            s = comma + 1;
        } else if (comma) {
            return -1;
        }
    }
    size_t ilen = strlen(fields[0]);
    if (ilen == 0 || ilen >= IF_NAMESIZE) return -1;
    for (size_t i = 0; i < ilen; i++) {
        unsigned char c = (unsigned char)fields[0][i];
        if (c <= ' ' || c == '/' || c == ':' || c >= 0x7f) return -1;
    }
    strcpy(nc->iface, fields[0]);
    const char *m = fields[1];
    if (strlen(m) != 17) return -1;
    for (int i = 0; i < 6; i++) {
        int hi = hexval(m[3 * i]), lo = hexval(m[3 * i + 1]);
        if (hi < 0 || lo < 0 || (i < 5 && m[3 * i + 2] != ':')) return -1;
        nc->mac[i] = (unsigned char)(hi << 4 | lo);
    }
    if (nc->mac[0] & 1) return -1;  // multicast
    nc->has_address = strcmp(fields[2], "-") != 0;
    if (!nc->has_address) {
        nc->prefix = 0;
        nc->has_gateway = 0;
        return strcmp(fields[3], "-") == 0 ? 0 : -1;
    }
    char *slash = strchr(fields[2], '/');
    if (!slash) return -1;
    *slash = 0;
    if (inet_pton(AF_INET, fields[2], &nc->addr) != 1) return -1;
    const char *pfx = slash + 1;
    if (!isdigit((unsigned char)pfx[0]) || (pfx[1] && (!isdigit((unsigned char)pfx[1]) || pfx[2]))) return -1;
    nc->prefix = atoi(pfx);
    if (nc->prefix > 32) return -1;
    nc->has_gateway = strcmp(fields[3], "-") != 0;
    if (nc->has_gateway && inet_pton(AF_INET, fields[3], &nc->gateway) != 1) return -1;
    return 0;
}

struct nlreq {
    struct nlmsghdr h;
    union {
        struct ifinfomsg link;
        struct ifaddrmsg addr;
        struct rtmsg route;
    } u;
    char attrs[128];
};

static void nl_attr(struct nlreq *r, unsigned short type, const void *data, size_t len) {
    struct rtattr *a = (struct rtattr *)((char *)r + NLMSG_ALIGN(r->h.nlmsg_len));
    a->rta_type = type;
    a->rta_len = (unsigned short)RTA_LENGTH(len);
    memcpy(RTA_DATA(a), data, len);
    r->h.nlmsg_len = NLMSG_ALIGN(r->h.nlmsg_len) + RTA_ALIGN(a->rta_len);
}

static unsigned nl_seq;

// Sends one request and waits for its acknowledgement; 0 or an errno value.
static int nl_talk(int fd, struct nlreq *r) {
    r->h.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
    r->h.nlmsg_seq = ++nl_seq;
    if (send(fd, r, r->h.nlmsg_len, 0) < 0) return errno;
    char buf[8192] __attribute__((aligned(4)));
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != r->h.nlmsg_seq) continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                return -e->error;
            }
        }
    }
}

static void nl_init(struct nlreq *r, unsigned short type, unsigned short flags, size_t body) {
    memset(r, 0, sizeof *r);
    r->h.nlmsg_len = NLMSG_LENGTH(body);
    r->h.nlmsg_type = type;
    r->h.nlmsg_flags = flags;
}

// Sets the link up (`up` 1) or down (0) and, with `mac`, its address, in one request; `up`
// -1 leaves the link's state alone.
static int link_set(int fd, int index, int up, const unsigned char *mac) {
    struct nlreq r;
    nl_init(&r, RTM_NEWLINK, 0, sizeof(struct ifinfomsg));
    r.u.link.ifi_family = AF_UNSPEC;
    r.u.link.ifi_index = index;
    if (mac) nl_attr(&r, IFLA_ADDRESS, mac, 6);
    if (up >= 0) {
        r.u.link.ifi_change = IFF_UP;
        r.u.link.ifi_flags = up ? IFF_UP : 0;
    }
    return nl_talk(fd, &r);
}

// Removes every IPv4 address of interface `index` but `keep` (when given and present, which
// sets `*kept`): a clone of a user-mode template already has its address, and re-adding it
// costs more than the rest of the configuration under TCG.
static int flush_addresses(int fd, int index, const struct in_addr *keep, int keep_prefix, int *kept) {
    *kept = 0;
    struct {
        unsigned char prefix;
        struct in_addr local;
        int has_local;
    } found[64];
    int count = 0;
    struct nlreq r;
    nl_init(&r, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sizeof(struct ifaddrmsg));
    r.u.addr.ifa_family = AF_INET;
    r.h.nlmsg_seq = ++nl_seq;
    if (send(fd, &r, r.h.nlmsg_len, 0) < 0) return errno;
    char buf[16384] __attribute__((aligned(4)));
    for (int done = 0; !done;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) break;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != r.h.nlmsg_seq) continue;
            if (h->nlmsg_type == NLMSG_DONE) {
                done = 1;
                break;
            }
            if (h->nlmsg_type == NLMSG_ERROR) return -((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (h->nlmsg_type != RTM_NEWADDR) continue;
            struct ifaddrmsg *ifa = NLMSG_DATA(h);
            if ((int)ifa->ifa_index != index || ifa->ifa_family != AF_INET || count == 64) continue;
            found[count].prefix = ifa->ifa_prefixlen;
            found[count].has_local = 0;
            int len = (int)IFA_PAYLOAD(h);
            for (struct rtattr *a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
                if ((a->rta_type == IFA_LOCAL || (a->rta_type == IFA_ADDRESS && !found[count].has_local)) &&
                    RTA_PAYLOAD(a) == 4) {
                    memcpy(&found[count].local, RTA_DATA(a), 4);
                    found[count].has_local = 1;
                }
            }
            if (found[count].has_local) count++;
        }
    }
    for (int i = 0; i < count; i++) {
        if (keep && found[i].local.s_addr == keep->s_addr && found[i].prefix == keep_prefix) {
            *kept = 1;
            continue;
        }
        nl_init(&r, RTM_DELADDR, 0, sizeof(struct ifaddrmsg));
        r.u.addr.ifa_family = AF_INET;
        r.u.addr.ifa_prefixlen = found[i].prefix;
        r.u.addr.ifa_index = (unsigned)index;
        nl_attr(&r, IFA_LOCAL, &found[i].local, 4);
        int e = nl_talk(fd, &r);
        if (e && e != EADDRNOTAVAIL) return e;
    }
    return 0;
}

static int add_address(int fd, int index, struct in_addr addr, int prefix) {
    struct nlreq r;
    nl_init(&r, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, sizeof(struct ifaddrmsg));
    r.u.addr.ifa_family = AF_INET;
    r.u.addr.ifa_prefixlen = (unsigned char)prefix;
    r.u.addr.ifa_scope = RT_SCOPE_UNIVERSE;
    r.u.addr.ifa_index = (unsigned)index;
    nl_attr(&r, IFA_LOCAL, &addr, 4);
    nl_attr(&r, IFA_ADDRESS, &addr, 4);
    if (prefix < 31) {
        uint32_t mask = prefix == 0 ? 0 : htonl(~((1u << (32 - prefix)) - 1));
        struct in_addr brd = {.s_addr = addr.s_addr | ~mask};
        nl_attr(&r, IFA_BROADCAST, &brd, 4);
    }
    return nl_talk(fd, &r);
}

static int replace_default_route(int fd, int index, struct in_addr gateway) {
    struct nlreq r;
    nl_init(&r, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, sizeof(struct rtmsg));
    r.u.route.rtm_family = AF_INET;
    r.u.route.rtm_table = RT_TABLE_MAIN;
    r.u.route.rtm_protocol = RTPROT_BOOT;
    r.u.route.rtm_scope = RT_SCOPE_UNIVERSE;
    r.u.route.rtm_type = RTN_UNICAST;
    nl_attr(&r, RTA_GATEWAY, &gateway, 4);
    nl_attr(&r, RTA_OIF, &index, 4);
    return nl_talk(fd, &r);
}

// Announces a new address (gratuitous ARP request), so that the bridge and peers learn at once
// where it is now (a stopped VM may have had it, behind another tap). Best effort.
static void announce(int index, const unsigned char *mac, struct in_addr addr) {
    int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, htons(ETH_P_ARP));
    if (fd < 0) return;
    unsigned char arp[28];
    struct arphdr *h = (struct arphdr *)arp;
    h->ar_hrd = htons(ARPHRD_ETHER);
    h->ar_pro = htons(ETH_P_IP);
    h->ar_hln = 6;
    h->ar_pln = 4;
    h->ar_op = htons(ARPOP_REQUEST);
    memcpy(arp + 8, mac, 6);
    memcpy(arp + 14, &addr, 4);
    memset(arp + 18, 0, 6);
    memcpy(arp + 24, &addr, 4);
    struct sockaddr_ll to = {0};
    to.sll_family = AF_PACKET;
    to.sll_protocol = htons(ETH_P_ARP);
    to.sll_ifindex = index;
    to.sll_halen = 6;
    memset(to.sll_addr, 0xff, 6);
    sendto(fd, arp, sizeof arp, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof to);
    close(fd);
}

// Configures the interface; when the address is new to it, `*announce_at` is set to the
// interface's index and the caller announces the address (`announce`) once it has answered:
// peers learn the MAC a little later, the clone is not held up for it.
static int configure_net(const struct netconf *nc, int *announce_at, char *err, size_t errlen) {
    *announce_at = 0;
    int index = (int)if_nametoindex(nc->iface);
    if (index == 0) {
        snprintf(err, errlen, "net: no interface %s", nc->iface);
        return -1;
    }
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) {
        snprintf(err, errlen, "net: netlink: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const char *step = "set MAC, link up";
    // virtio-net changes its MAC while up (IFF_LIVE_ADDR_CHANGE): a clone of a template whose
    // link was up already keeps its rx rings, which a down/up would rebuild (costly under
    // TCG). Devices that refuse get the down, MAC, up sequence.
    int e = link_set(fd, index, 1, nc->mac);
    if (e == EBUSY) {
        if ((e = link_set(fd, index, 0, NULL))) step = "link down";
        else if ((e = link_set(fd, index, -1, nc->mac))) step = "set MAC";
        else if ((e = link_set(fd, index, 1, NULL))) step = "link up";
    }
    int kept = 0;
    if (!e && (e = flush_addresses(fd, index, nc->has_address ? &nc->addr : NULL, nc->prefix, &kept)))
        step = "flush addresses";
    if (!e && nc->has_address && !kept && (e = add_address(fd, index, nc->addr, nc->prefix))) step = "add address";
    if (!e && nc->has_gateway && (e = replace_default_route(fd, index, nc->gateway))) step = "default route";
    close(fd);
    if (e) {
        snprintf(err, errlen, "net: %s %s: %s", step, nc->iface, strerror(e));
        return -1;
    }
    if (nc->has_address && !kept) *announce_at = index;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Control requests

static void port_flush(struct port *p);

// Where /etc is on a disk (the Debian guest), the files a clone rewrites at hello are
// bind-mounted from copies in /run first: a clone's first write to ext4 runs the filesystem's
// journaling code for the first time in that QEMU process, 50-60 ms of translation under TCG
// while the host waits for the answer. The disk keeps the template's files; a VM's disk does
// not outlive the VM. Already bind-mounted files (systemd's transient machine-id) are left.
static void identity_on_tmpfs(void) {
    struct statfs etc, run;
    if (statfs("/etc", &etc) != 0 || statfs("/run", &run) != 0) return;
    if (etc.f_type == TMPFS_MAGIC || etc.f_type == RAMFS_MAGIC || run.f_type != TMPFS_MAGIC) return;
    if (mkdir("/run/vmpool", 0755) != 0 && errno != EEXIST) return;
    static const char *names[] = {"hostname", "machine-id"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char etc_path[64], run_path[64], text[256];
        snprintf(etc_path, sizeof etc_path, "/etc/%s", names[i]);
        snprintf(run_path, sizeof run_path, "/run/vmpool/%s", names[i]);
        struct stat st;
        if (lstat(etc_path, &st) != 0 || !S_ISREG(st.st_mode) || mount_point(etc_path)) continue;
        int in = open(etc_path, O_RDONLY | O_CLOEXEC);
        if (in < 0) continue;
        ssize_t len = read(in, text, sizeof text - 1);
        close(in);
        if (len < 0 || len == (ssize_t)sizeof text - 1) continue;  // unreadable, or not a name or an id
        text[len] = 0;
        if (replace_file(run_path, text, st.st_mode & 07777) != 0 ||
            mount(run_path, etc_path, NULL, MS_BIND, NULL) != 0) {
            fprintf(stderr, "vmpool-agent: %s stays on the disk: %s\n", etc_path, strerror(errno));
            unlink(run_path);
        }
    }
}

static void hello(struct port *p, const char *id, char **args, int nargs) {
    const char *time_s = NULL, *seed_s = NULL, *name_s = NULL, *machine_s = NULL, *net_s = NULL;
    int positional = 0;
    for (int i = 0; i < nargs; i++) {
        char *eq = strchr(args[i], '=');
        const char **slot = NULL;
        if (!eq) {
            // The older form: `hello SEC.FRAC HEX`.
            slot = positional == 0 ? &time_s : positional == 1 ? &seed_s : NULL;
            positional++;
            if (!slot) {
                answer(p, id, "error", "too many arguments");
                return;
            }
            *slot = args[i];
            continue;
        }
        *eq = 0;
        const char *key = args[i], *value = eq + 1;
        if (strcmp(key, "time") == 0) slot = &time_s;
        else if (strcmp(key, "seed") == 0) slot = &seed_s;
        else if (strcmp(key, "name") == 0) slot = &name_s;
        else if (strcmp(key, "machine") == 0) slot = &machine_s;
        else if (strcmp(key, "net") == 0) slot = &net_s;
        if (!slot) {
            char msg[80];
            snprintf(msg, sizeof msg, "unknown key %.40s", key);
            answer(p, id, "error", msg);
            return;
        }
        *slot = value;
    }
    struct timespec ts;
    struct netconf nc;
    const char *invalid = NULL;
    if (time_s && parse_time(time_s, &ts) != 0) invalid = "invalid time";
    else if (seed_s && !valid_hex(seed_s)) invalid = "invalid hex";
    else if (name_s && !valid_hostname(name_s)) invalid = "invalid name";
    else if (machine_s && !valid_machine_id(machine_s)) invalid = "invalid machine id";
    else if (net_s && parse_net(net_s, &nc) != 0) invalid = "invalid net";
    if (invalid) {
        answer(p, id, "error", invalid);
        return;
    }
    char err[256] = "";
    int announce_at = 0;
    // While it applies an identity the agent runs first: the clock step and the new hostname
    // wake systemd (it re-arms its timers, re-reads the hostname), which would otherwise
    // preempt the agent, and in a fresh clone that is code QEMU translates for the first time
    // (tens of ms under TCG) before the host hears the answer. systemd's reaction still runs,
    // right after the answer. Commands are never started from here (and would not inherit it).
    struct sched_param first = {.sched_priority = 1};
    int raised = sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &first) == 0;
    if (time_s && clock_settime(CLOCK_REALTIME, &ts) != 0)
        snprintf(err, sizeof err, "cannot set the clock: %s", strerror(errno));
    else if (seed_s && seed(seed_s) != 0)
        snprintf(err, sizeof err, "cannot seed the RNG");
    else if (name_s && set_hostname(name_s, err, sizeof err) != 0) {
    } else if (machine_s && set_machine_id(machine_s, err, sizeof err) != 0) {
    } else if (net_s && configure_net(&nc, &announce_at, err, sizeof err) != 0) {
    }
    if (*err) answer(p, id, "error", err);
    else answer(p, id, "ok", "pong");
    port_flush(p);  // the answer first: the host counts the clone ready on it
    if (raised) {
        struct sched_param none = {0};
        sched_setscheduler(0, SCHED_BATCH, &none);
    }
    if (announce_at) announce(announce_at, nc.mac, nc.addr);
}

static void control(struct port *p, char *text) {
    char *save = NULL;
    char *args[16];
    int n = 0;
    for (char *tok = strtok_r(text, " \t\r\n", &save); tok && n < 16; tok = strtok_r(NULL, " \t\r\n", &save))
        args[n++] = tok;
    if (n == 0) return;
    const char *id = args[0];
    const char *cmd = n > 1 ? args[1] : NULL;
    if (!cmd) {
        answer(p, id, "error", "missing command");
    } else if (strcmp(cmd, "ping") == 0) {
        answer(p, id, "ok", "pong");
    } else if (strcmp(cmd, "info") == 0) {
        info(p, id);
    } else if (strcmp(cmd, "online") == 0) {
        online_all("/sys/devices/system/memory", "memory", "state", "offline", "online");
        online_all("/sys/devices/system/cpu", "cpu", "online", "0", "1");
        info(p, id);
    } else if (strcmp(cmd, "time") == 0) {
        struct timespec ts;
        if (n < 3 || parse_time(args[2], &ts) != 0) {
            answer(p, id, "error", "invalid time");
        } else if (clock_settime(CLOCK_REALTIME, &ts) != 0) {
            char err[128];
            snprintf(err, sizeof err, "cannot set the clock: %s", strerror(errno));
            answer(p, id, "error", err);
        } else {
            answer(p, id, "ok", NULL);
        }
    } else if (strcmp(cmd, "seed") == 0) {
        if (n < 3 || !valid_hex(args[2])) answer(p, id, "error", "invalid hex");
        else if (seed(args[2]) != 0) answer(p, id, "error", "cannot seed the RNG");
        else answer(p, id, "ok", NULL);
    } else if (strcmp(cmd, "hello") == 0) {
        hello(p, id, args + 2, n - 2);
    } else {
        answer(p, id, "error", "unknown command");
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

// Sets KEY=VALUE in base_env, replacing an entry with the same key.
static void base_env_set(char *entry) {
    char *eq = entry ? strchr(entry, '=') : NULL;
    if (!eq || eq == entry) return;
    size_t klen = (size_t)(eq - entry) + 1;
    for (size_t k = 0; k < nbase; k++) {
        if (strncmp(base_env[k], entry, klen) == 0) {
            base_env[k] = entry;
            return;
        }
    }
    if (nbase < sizeof base_env / sizeof base_env[0]) base_env[nbase++] = entry;
}

// The defaults: the agent's own, then the image's (IMAGE_CONFIG), then the carried busybox's
// applets at the end of PATH. Lines longer than 4 KiB are skipped.
static void load_defaults(void) {
    for (size_t i = 0; i < sizeof default_env / sizeof default_env[0]; i++) base_env_set(strdup(default_env[i]));
    FILE *f = fopen(IMAGE_CONFIG, "re");
    if (f) {
        char line[4096];
        int n = 0;
        while (n < IMAGE_ENV_MAX && fgets(line, sizeof line, f)) {
            size_t len = strlen(line);
            if (len > 0 && line[len - 1] == '\n') {
                line[--len] = 0;
            } else if (!feof(f)) {
                int c;
                while ((c = fgetc(f)) != EOF && c != '\n') {
                }
                continue;
            }
            if (strncmp(line, "env ", 4) == 0) {
                base_env_set(strdup(line + 4));
                n++;
            } else if (strncmp(line, "workdir /", 9) == 0) {
                base_cwd = strdup(line + 8);
                base_cwd_from_image = base_cwd != NULL;
                if (!base_cwd) base_cwd = "/";
            }
        }
        fclose(f);
    }
    if (access(CARRIED_BUSYBOX, X_OK) == 0) {
        for (size_t k = 0; k < nbase; k++) {
            if (strncmp(base_env[k], "PATH=", 5) != 0) continue;
            size_t len = strlen(base_env[k]) + sizeof CARRIED_PATH;
            char *path = malloc(len);
            if (path) {
                snprintf(path, len, "%s%s", base_env[k], CARRIED_PATH);
                base_env[k] = path;
            }
        }
    }
}

static void job_free(struct port *p) {
    struct job *j = p->job;
    if (!j) return;
    close_fd(&j->status_fd);
    close_fd(&j->out_fd);
    close_fd(&j->err_fd);
    close_fd(&j->in_fd);
    free(j);
    p->job = NULL;
    if (p->blocked == BLOCK_STDIN) p->blocked = BLOCK_NONE;
}

static void job_signal(struct job *j, int sig) {
    if (j->pid <= 0) return;
    if (kill(-j->pid, sig) != 0 && !j->exited) kill(j->pid, sig);
}

// What the child reports on the status pipe when it cannot run the command.
struct child_error {
    int stage;  // 1: stdin or terminal, 2: exec, 3: working directory
    int err;
};

static void child_fail(int fd, int stage) {
    struct child_error ce = {stage, errno};
    ssize_t rc = write(fd, &ce, sizeof ce);
    (void)rc;
    _exit(127);
}

// Whether the guest runs under QEMU's software emulation (TCG), whose CPUID hypervisor
// signature is "TCGTCGTCGTCG". TCG finds translated code by virtual address: a process whose
// libraries are mapped somewhere new at every start (ASLR) has the dynamic loader and libc
// translated again each time. Measured on the Debian guest: /bin/true from a shell loop,
// 29-32 ms each with randomization, 10-12 ms without. Under KVM nothing is translated.
static int under_tcg(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    if (!(c >> 31 & 1)) return 0;  // no hypervisor
    __cpuid(0x40000000, a, b, c, d);
    char sig[12];
    memcpy(sig, &b, 4);
    memcpy(sig + 4, &c, 4);
    memcpy(sig + 8, &d, 4);
    return memcmp(sig, "TCGTCGTCGTCG", 12) == 0;
#else
    return 0;
#endif
}

// A parsed C frame; the strings point into the frame's payload.
struct request {
    char **argv;
    char **envp;
    const char *cwd;
    const char *tty;
    struct winsize ws;
    int want_stdin;
    int keep_layout;  // VMPOOL_ASLR=1 in the command's environment
    int cwd_default;  // cwd is the image's WorkingDir: "/" if it does not exist
};

// Parses a C payload (entries of a tag byte and a NUL-terminated string); NULL or why not.
static const char *parse_request(unsigned char *payload, size_t len, struct request *rq) {
    size_t nargv = 0, nenv = 0;
    for (size_t at = 0; at < len;) {
        unsigned char tag = payload[at];
        size_t rest = len - at - 1;
        unsigned char *nul = rest ? memchr(payload + at + 1, 0, rest) : NULL;
        if (!nul) return "bad request: unterminated entry";
        if (tag == 'a') nargv++;
        else if (tag == 'e') nenv++;
        else if (tag != 'd' && tag != 't' && tag != 'i') return "bad request: unknown entry";
        at = (size_t)(nul - payload) + 1;
    }
    if (nargv == 0) return "bad request: no argv";
    rq->argv = calloc(nargv + 1, sizeof *rq->argv);
    rq->envp = calloc(nenv + nbase + 2, sizeof *rq->envp);
    if (!rq->argv || !rq->envp) return "out of memory";
    size_t na = 0, ne = 0;
    for (size_t i = 0; i < nbase; i++) rq->envp[ne++] = base_env[i];
    rq->cwd = base_cwd;
    rq->cwd_default = base_cwd_from_image;
    for (size_t at = 0; at < len;) {
        unsigned char tag = payload[at];
        char *value = (char *)payload + at + 1;
        at += 1 + strlen(value) + 1;
        if (tag == 'a') {
            rq->argv[na++] = value;
        } else if (tag == 'e') {
            char *eq = strchr(value, '=');
            if (!eq || eq == value) return "bad request: environment entry without KEY=";
            size_t klen = (size_t)(eq - value) + 1;  // the key and its '='
            size_t k = 0;
            while (k < ne && strncmp(rq->envp[k], value, klen) != 0) k++;
            rq->envp[k] = value;
            if (k == ne) ne++;
            if (strncmp(value, "VMPOOL_ASLR=", 12) == 0) rq->keep_layout = strcmp(value + 12, "1") == 0;
        } else if (tag == 'd') {
            if (!*value) return "bad request: empty working directory";
            rq->cwd = value;
            rq->cwd_default = 0;
        } else if (tag == 't') {
            rq->tty = value;
            if (parse_size(value, &rq->ws.ws_row, &rq->ws.ws_col) != 0) return "bad request: tty size";
        } else if (tag == 'i') {
            if (strcmp(value, "1") == 0) rq->want_stdin = 1;
            else if (strcmp(value, "0") != 0) return "bad request: stdin flag";
        }
    }
    if (rq->tty) {
        size_t k = 0;
        while (k < ne && strncmp(rq->envp[k], "TERM=", 5) != 0) k++;
        if (k == ne) rq->envp[ne++] = "TERM=xterm";
    }
    return NULL;
}

// Forks the command of `rq`; fills `j` or returns why not.
static const char *launch(struct request *rq, struct job *j) {
    int status[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, in[2] = {-1, -1};
    int master = -1;
    char slave[64] = "";
    const char *fail = NULL;
    if (pipe2(status, O_CLOEXEC) != 0) {
        fail = "pipe";
    } else if (rq->tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0 || ptsname_r(master, slave, sizeof slave) != 0)
            fail = "pty";
        else
            ioctl(master, TIOCSWINSZ, &rq->ws);
    } else if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 ||
               (rq->want_stdin && pipe2(in, O_CLOEXEC) != 0)) {
        fail = "pipe";
    }
    pid_t pid = -1;
    if (!fail) {
        pid = fork();
        if (pid < 0) fail = "fork";
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        // Every disposition back to its default: a signal the agent was started with ignored
        // (SIGINT and SIGQUIT are, under a shell's background job) must reach the command.
        for (int sig = 1; sig < NSIG; sig++) {
            if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
        }
        struct sched_param sp = {0};
        sched_setscheduler(0, SCHED_OTHER, &sp);
        setsid();
        if (rq->tty) {
            int fd = open(slave, O_RDWR);  // the session's controlling terminal
            if (fd < 0) child_fail(status[1], 1);
            ioctl(fd, TIOCSCTTY, 0);
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
            if (fd > 2) close(fd);
        } else {
            int fd0 = rq->want_stdin ? in[0] : open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (fd0 < 0) child_fail(status[1], 1);
            dup2(fd0, 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        if (chdir(rq->cwd) != 0 && (!rq->cwd_default || chdir("/") != 0)) child_fail(status[1], 3);
        // Under TCG commands (and what they start) get a fixed address-space layout, unless
        // the request asks for randomization (VMPOOL_ASLR=1): see under_tcg.
        if (fixed_layout && !rq->keep_layout) {
            int persona = personality(0xffffffff);
            if (persona != -1) personality((unsigned long)persona | ADDR_NO_RANDOMIZE);
        }
        environ = rq->envp;  // execvp searches the PATH of the new environment
        execvp(rq->argv[0], rq->argv);
        child_fail(status[1], 2);
    }
    int saved = errno;
    close_fd(&status[1]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    close_fd(&in[0]);
    if (fail) {
        close_fd(&status[0]);
        close_fd(&out[0]);
        close_fd(&err[0]);
        close_fd(&in[1]);
        close_fd(&master);
        errno = saved;
        return fail;
    }
    j->pid = pid;
    j->status_fd = status[0];
    j->pty = rq->tty != NULL;
    if (j->pty) {
        j->out_fd = master;
        j->err_fd = -1;
        j->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
    } else {
        j->out_fd = out[0];
        j->err_fd = err[0];
        j->in_fd = in[1];
        fcntl(out[0], F_SETPIPE_SZ, PIPE_SIZE);
        fcntl(err[0], F_SETPIPE_SZ, PIPE_SIZE);
    }
    set_nonblock(j->status_fd);
    set_nonblock(j->out_fd);
    if (j->err_fd >= 0) set_nonblock(j->err_fd);
    if (j->in_fd >= 0) set_nonblock(j->in_fd);
    snprintf(j->argv0, sizeof j->argv0, "%s", rq->argv[0]);
    snprintf(j->cwd, sizeof j->cwd, "%s", rq->cwd);
    return NULL;
}

static void start_command(struct port *p, unsigned char *payload, size_t len) {
    if (p->job) {
        exit_error(p, 125, "busy");
        return;
    }
    struct request rq = {0};
    const char *bad = parse_request(payload, len, &rq);
    struct job *j = NULL;
    if (!bad) {
        j = calloc(1, sizeof *j);
        if (!j) {
            bad = "out of memory";
        } else {
            const char *fail = launch(&rq, j);
            if (fail) {
                static char msg[96];
                snprintf(msg, sizeof msg, "%s: %s", fail, strerror(errno));
                bad = msg;
                free(j);
                j = NULL;
            }
        }
    }
    free(rq.argv);
    free(rq.envp);
    if (bad) exit_error(p, 125, bad);
    else p->job = j;
}

// The exec status pipe is readable: EOF alone means the command runs.
static void job_status(struct job *j) {
    struct child_error ce;
    ssize_t n = read(j->status_fd, &ce, sizeof ce);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    close_fd(&j->status_fd);
    if (n != (ssize_t)sizeof ce) {
        j->exec_ok = 1;
        return;
    }
    j->fail_code = ce.stage == 2 && ce.err == ENOENT ? 127 : 126;
    const char *what = ce.stage == 2 ? "exec" : ce.stage == 3 ? "chdir" : "stdin";
    snprintf(j->fail_msg, sizeof j->fail_msg, "%s %s: %s", what, ce.stage == 3 ? j->cwd : j->argv0,
             strerror(ce.err));
}

// Reads command output into the port's ring as frames of `type`.
static void job_read(struct port *p, int *fd, unsigned char type) {
    for (int round = 0; round < 8 && *fd >= 0; round++) {
        size_t room = out_free(p);
        if (room < OUT_RESERVE + FRAME_HEADER + MIN_READ) return;
        size_t want = room - OUT_RESERVE - FRAME_HEADER;
        if (want > MAX_OUT_PAYLOAD) want = MAX_OUT_PAYLOAD;
        struct iovec iov[2];
        int cnt = ring_iov(p, p->out_tail + FRAME_HEADER, want, iov);
        ssize_t n = readv(*fd, iov, cnt);
        if (n > 0) {
            unsigned char h[FRAME_HEADER];
            h[0] = type;
            put32(h + 1, (uint32_t)n);
            out_put(p, h, sizeof h);  // the header goes in front of the bytes just read
            p->out_tail += (size_t)n;
            if ((size_t)n < want) return;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        close_fd(fd);  // EOF, or EIO from a pty whose slave side is closed
    }
}

// Sends S and X when due, and frees a finished job.
static void job_progress(struct port *p) {
    struct job *j = p->job;
    if (!j || out_free(p) < 512) return;
    if (j->fail_code) {
        exit_error(p, j->fail_code, j->fail_msg);
        job_free(p);
        return;
    }
    if (j->exec_ok && !j->started) {
        char pid[16];
        int n = snprintf(pid, sizeof pid, "%d", (int)j->pid);
        out_frame(p, 'S', pid, (size_t)n);
        j->started = 1;
    }
    if (j->started && j->exited && j->out_fd < 0 && j->err_fd < 0) {
        char text[32];
        int n = WIFSIGNALED(j->status) ? snprintf(text, sizeof text, "signal %d", WTERMSIG(j->status))
                                        : snprintf(text, sizeof text, "exit %d", WEXITSTATUS(j->status));
        out_frame(p, 'X', text, (size_t)n);
        job_free(p);
    }
}

static void job_stdin_close(struct job *j) {
    if (j->in_fd < 0) return;
    if (j->pty) {
        // A pty has no half-close: send the EOF character instead.
        struct termios tio;
        unsigned char eof = 4;
        if (tcgetattr(j->in_fd, &tio) == 0 && tio.c_cc[VEOF]) eof = tio.c_cc[VEOF];
        ssize_t rc = write(j->in_fd, &eof, 1);
        (void)rc;
    }
    close_fd(&j->in_fd);
}

// ---------------------------------------------------------------------------------------------
// Sessions and the frame parser

static void parser_reset(struct port *p) {
    p->in_start = p->in_end = 0;
    p->phase = PHASE_HEADER;
    p->hdr_len = 0;
    p->len = p->got = 0;
    p->discard = 0;
    p->blocked = BLOCK_NONE;
    free(p->payload);
    p->payload = NULL;
}

static int parser_aligned(const struct port *p) { return p->phase == PHASE_HEADER && p->hdr_len == 0; }

// Drops a frame half received: the parser waits for a header again.
static void parser_restart(struct port *p) {
    p->phase = PHASE_HEADER;
    p->hdr_len = 0;
    p->len = p->got = 0;
    free(p->payload);
    p->payload = NULL;
}

static int token_char(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-';
}

// Whether the first `n` bytes of a token are valid characters.
static int token_prefix_ok(const unsigned char *t, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!token_char(t[i])) return 0;
    return 1;
}

// An H frame: the port's earlier session ends (its command is killed, its output not yet sent
// is dropped) and the token goes back; the host takes what follows the echo as this session's.
static void session_begin(struct port *p, const unsigned char *token, size_t len) {
    if (len < TOKEN_MIN || len > TOKEN_MAX || !token_prefix_ok(token, len)) return;
    if (p->job) {
        job_signal(p->job, SIGKILL);
        job_free(p);
    }
    p->out_head = p->out_tail = 0;
    p->blocked = BLOCK_NONE;
    p->inband = 1;
    out_frame(p, 'H', token, len);
}

// Skipping input up to the next H frame: drops the bytes that cannot begin one. Returns true
// when the input now begins with a whole, valid H frame; false when more input is needed (a
// candidate cut by the end of the input is kept).
static int resync(struct port *p) {
    const unsigned char *data = p->in + p->in_start;
    size_t avail = p->in_end - p->in_start, at = 0;
    for (; at < avail; at++) {
        if (data[at] != 'H') continue;
        size_t have = avail - at;
        if (have < FRAME_HEADER) break;
        uint32_t len = get32(data + at + 1);
        if (len < TOKEN_MIN || len > TOKEN_MAX) continue;
        size_t n = have - FRAME_HEADER < len ? have - FRAME_HEADER : len;
        if (!token_prefix_ok(data + at + FRAME_HEADER, n)) continue;
        if (n < len) break;
        p->in_start += at;
        p->resync = 0;
        return 1;
    }
    p->in_start += at;
    return 0;
}

// In-band: the port shows no host connected. That may be a stale notice of an older
// connection while the current host still sends, so nothing ends here; see host_check.
static void host_down(struct port *p) {
    if (p->hup) return;
    p->hup = 1;
    p->quiet_since = now_ms();
    idle_changed = 1;
}

// In-band, no host shown connected: once nothing has come for host_gone_ms, the host is gone.
// A running command is killed and the output for that host dropped; a frame it left half
// sent is dropped with whatever follows, up to the next H. Returns the ms until this is due,
// or -1 when there is nothing to end.
static long long host_check(struct port *p, long long now) {
    if (p->state != PORT_ACTIVE || !p->hup || (!p->job && parser_aligned(p))) return -1;
    long long due = p->quiet_since + host_gone_ms;
    if (now < due) return due - now;
    if (p->job) {
        job_signal(p->job, SIGKILL);
        job_free(p);
    }
    p->out_head = p->out_tail = 0;
    p->blocked = BLOCK_NONE;
    if (!parser_aligned(p)) {
        parser_restart(p);
        p->resync = 1;
    }
    return -1;
}

static int session_start(struct port *p) {
    if (!p->in) p->in = malloc(IN_SIZE);
    if (!p->out) p->out = malloc(OUT_SIZE);
    if (!p->in || !p->out) return -1;
    parser_reset(p);
    p->in_end = p->carry;  // input that arrived before the host's connect notice
    p->carry = 0;
    p->out_head = p->out_tail = 0;
    p->state = PORT_ACTIVE;
    return 0;
}

// Settles what a virtio port holds when its session ends. Data and the host's connect and
// disconnect notices travel on different virtqueues, and the driver handles data at once but
// notices later: by the time a disconnect shows, all of the ended session's input is here,
// possibly followed by the first frames of a host that has connected since. The bytes that
// complete the frame the session was in are dropped. If the rest ends on a frame boundary it
// is kept for the next session (whole frames: the next host's, or ones the old host sent
// without waiting for their answers); if it ends inside a frame, it is what is left of a
// stream cut short, and is dropped. Returns how many bytes, now at the start of p->in, the
// next session starts with.
static size_t settle(struct port *p) {
    unsigned char hdr[FRAME_HEADER];
    size_t hdr_len = 0, need = 0;  // a header being read, or payload bytes still to come
    int garbage = p->discard;
    if (p->phase == PHASE_HEADER) {
        memcpy(hdr, p->hdr, p->hdr_len);
        hdr_len = p->hdr_len;
    } else if (p->phase == PHASE_CHECK) {
        need = p->len;
        garbage |= p->len > MAX_IN_PAYLOAD;
    } else {
        need = p->len - p->got;
    }
    if (!p->in) return 0;
    // Unparsed input first, then everything the port holds (the virtqueue holds at most a
    // few hundred KiB of a host that is gone; past 1 MiB a new host is streaming already).
    size_t n = p->in_end - p->in_start;
    memmove(p->in, p->in + p->in_start, n);
    int overflow = 0;
    for (int round = 0; round < 16;) {
        if (n == IN_SIZE) {
            overflow = 1;  // more than a session start: a stream cut short
            n = 0;
            round++;
        }
        ssize_t r = read(p->fd, p->in + n, IN_SIZE - n);
        if (r > 0) {
            n += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        break;  // 0: empty, the host gone; EAGAIN: empty, a host connected again
    }
    if (garbage || overflow) return 0;
    size_t at = 0, boundary = SIZE_MAX;
    if (hdr_len == 0 && need == 0) boundary = 0;
    while (at < n) {
        if (need > 0) {
            size_t k = n - at < need ? n - at : need;
            at += k;
            need -= k;
        } else {
            hdr[hdr_len++] = p->in[at++];
            if (hdr_len < FRAME_HEADER) continue;
            hdr_len = 0;
            need = get32(hdr + 1);
            if (need > MAX_IN_PAYLOAD) return 0;
        }
        if (need == 0 && hdr_len == 0 && boundary == SIZE_MAX) boundary = at;
    }
    if (need > 0 || hdr_len > 0 || boundary == SIZE_MAX) return 0;
    memmove(p->in, p->in + boundary, n - boundary);
    return n - boundary;
}

static void session_end(struct port *p) {
    if (p->job) {
        job_signal(p->job, SIGKILL);
        job_free(p);
    }
    size_t carry = testing ? 0 : settle(p);
    parser_reset(p);
    p->carry = carry;
    free(p->out);
    p->out = NULL;
    p->out_head = p->out_tail = 0;
    if (carry == 0) {
        free(p->in);
        p->in = NULL;
    }
    if (testing) {
        close_fd(&p->fd);
        p->state = PORT_DEAD;
        return;
    }
    p->state = PORT_IDLE;
    idle_changed = 1;
}

// Handles one complete non-I frame.
static void dispatch(struct port *p) {
    unsigned char *payload = p->payload;
    size_t len = p->len;
    p->payload = NULL;
    switch (p->type) {
    case 'H':
        session_begin(p, payload, payload ? len : 0);
        break;
    case 'Q': {
        char *text = payload ? (char *)payload : "";
        if (payload) payload[len] = 0;
        control(p, text);
        break;
    }
    case 'C':
        if (!payload) exit_error(p, 125, p->job ? "busy" : "bad request: no argv");
        else start_command(p, payload, len);
        break;
    case 'K':
        if (p->job && payload) {
            payload[len] = 0;
            char *end;
            long sig = strtol((char *)payload, &end, 10);
            if (end != (char *)payload && *end == 0 && sig >= 1 && sig <= 64) job_signal(p->job, (int)sig);
        }
        break;
    case 'W':
        if (p->job && p->job->pty && payload) {
            payload[len] = 0;
            struct winsize ws = {0};
            int fd = p->job->in_fd >= 0 ? p->job->in_fd : p->job->out_fd;
            if (fd >= 0 && parse_size((char *)payload, &ws.ws_row, &ws.ws_col) == 0) ioctl(fd, TIOCSWINSZ, &ws);
        }
        break;
    default:
        break;  // unknown frame types are skipped
    }
    free(payload);
}

// Consumes buffered input until it runs out or something downstream is full.
static void parse(struct port *p) {
    while (p->state == PORT_ACTIVE && p->blocked == BLOCK_NONE) {
        size_t avail = p->in_end - p->in_start;
        unsigned char *data = p->in + p->in_start;
        if (p->discard) {
            p->in_start = p->in_end = 0;
            return;
        }
        if (p->phase == PHASE_HEADER) {
            if (p->resync && p->hdr_len == 0 && !resync(p)) break;
            avail = p->in_end - p->in_start;
            data = p->in + p->in_start;
            if (avail == 0) break;
            size_t n = FRAME_HEADER - p->hdr_len < avail ? FRAME_HEADER - p->hdr_len : avail;
            memcpy(p->hdr + p->hdr_len, data, n);
            p->hdr_len += n;
            p->in_start += n;
            if (p->hdr_len < FRAME_HEADER) break;
            p->type = p->hdr[0];
            p->len = get32(p->hdr + 1);
            p->got = 0;
            p->hdr_len = 0;
            p->phase = PHASE_CHECK;
            continue;
        }
        if (p->phase == PHASE_CHECK) {
            if (p->len > MAX_IN_PAYLOAD) {
                if (out_free(p) < OUT_RESERVE) {
                    p->blocked = BLOCK_OUTPUT;
                    break;
                }
                answer(p, "0", "error", "frame too large");
                if (p->inband) {
                    parser_restart(p);
                    p->resync = 1;
                } else {
                    p->discard = 1;
                }
                continue;
            }
            if (p->type != 'I' && p->len > 0) {
                p->payload = malloc(p->len + 1);
                if (!p->payload) {
                    if (p->inband) {
                        parser_restart(p);
                        p->resync = 1;
                    } else {
                        p->discard = 1;
                    }
                    continue;
                }
            }
            p->phase = PHASE_PAYLOAD;
            continue;
        }
        if (p->type == 'I') {
            // Stdin bytes go straight from the input buffer to the command's stdin.
            struct job *j = p->job;
            size_t n = p->len - p->got < avail ? p->len - p->got : avail;
            if (n > 0 && j && j->in_fd >= 0) {
                ssize_t w = write(j->in_fd, data, n);
                if (w < 0) {
                    if (errno == EAGAIN) {
                        p->blocked = BLOCK_STDIN;
                        break;
                    }
                    if (errno == EINTR) continue;
                    close_fd(&j->in_fd);  // the command closed its stdin: drop the rest
                } else {
                    n = (size_t)w;
                }
            }
            p->in_start += n;
            p->got += (uint32_t)n;
            if (p->got < p->len) {
                if (n == 0) break;
                continue;
            }
            if (p->len == 0 && j) job_stdin_close(j);
            p->phase = PHASE_HEADER;
            continue;
        }
        if (p->got < p->len) {
            if (avail == 0) break;
            size_t n = p->len - p->got < avail ? p->len - p->got : avail;
            memcpy(p->payload + p->got, data, n);
            p->got += (uint32_t)n;
            p->in_start += n;
            if (p->got < p->len) break;
        }
        if (p->type != 'H' && out_free(p) < OUT_RESERVE) {  // an H empties the ring
            p->blocked = BLOCK_OUTPUT;
            break;
        }
        p->phase = PHASE_HEADER;
        dispatch(p);
    }
    if (p->in_start == p->in_end) p->in_start = p->in_end = 0;
}

// Reads what the port has into the input buffer; ends the session on EOF.
static void port_read(struct port *p) {
    for (int round = 0; round < 64; round++) {
        if (p->in_end == IN_SIZE && p->in_start > 0) {
            memmove(p->in, p->in + p->in_start, p->in_end - p->in_start);
            p->in_end -= p->in_start;
            p->in_start = 0;
        }
        if (p->in_end == IN_SIZE) return;
        ssize_t n = read(p->fd, p->in + p->in_end, IN_SIZE - p->in_end);
        if (n > 0) {
            p->in_end += (size_t)n;
            if (p->discard) p->in_start = p->in_end = 0;
            if (p->hup) p->quiet_since = now_ms();
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        // EOF: the host went away (virtio: no data and no host connected now).
        if (p->inband && !testing) host_down(p);
        else session_end(p);
        return;
    }
}

static void port_flush(struct port *p) {
    while (p->state == PORT_ACTIVE && out_used(p) > 0) {
        struct iovec iov[2];
        size_t len = out_used(p);
        int cnt = ring_iov(p, p->out_head, len, iov);
        ssize_t n = writev(p->fd, iov, cnt);
        if (n > 0) {
            p->out_head += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (p->inband && !testing) host_down(p);
        else session_end(p);
        return;
    }
    if (p->state == PORT_ACTIVE && out_used(p) == 0) p->out_head = p->out_tail = 0;
}

// Everything a port can do without waiting.
static void pump(struct port *p) {
    for (int round = 0; round < 4 && p->state == PORT_ACTIVE; round++) {
        size_t before_in = p->in_end - p->in_start, before_out = out_used(p);
        if (p->blocked == BLOCK_OUTPUT && out_free(p) >= OUT_RESERVE) p->blocked = BLOCK_NONE;
        parse(p);
        if (p->job) job_progress(p);
        port_flush(p);
        if (p->state != PORT_ACTIVE) return;
        if (p->in_end - p->in_start == before_in && out_used(p) == before_out) return;
    }
}

// ---------------------------------------------------------------------------------------------
// Ports

static struct port *port_new(const char *name, int fd) {
    if (nports == MAX_PORTS) return NULL;
    struct port *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    snprintf(p->name, sizeof p->name, "%s", name);
    p->fd = fd;
    p->state = PORT_IDLE;
    ports[nports++] = p;
    return p;
}

static void port_remove(int index) {
    struct port *p = ports[index];
    if (p->state == PORT_ACTIVE) session_end(p);
    close_fd(&p->fd);
    free(p->in);
    free(p->out);
    free(p->payload);
    free(p);
    ports[index] = ports[--nports];
}

// Virtio ports out of the poll set, after a notice or data (SIGIO): an idle port without
// POLLHUP has a host connected now; an in-band port without a host shown connected is read
// when data waits (a host whose connect notice is late or lost still gets its answers) and
// polled again once its host shows.
static void check_idle(void) {
    struct pollfd pfd[MAX_PORTS];
    struct port *which[MAX_PORTS];
    int n = 0;
    for (int i = 0; i < nports; i++) {
        struct port *p = ports[i];
        if (p->fd < 0 || !(p->state == PORT_IDLE || (p->state == PORT_ACTIVE && p->hup))) continue;
        which[n] = p;
        pfd[n].fd = p->fd;
        pfd[n].events = POLLIN;
        pfd[n].revents = 0;
        n++;
    }
    if (n == 0 || poll(pfd, (nfds_t)n, 0) < 0) return;
    for (int i = 0; i < n; i++) {
        struct port *p = which[i];
        if (p->state == PORT_ACTIVE) {
            if (pfd[i].revents & POLLIN) port_read(p);
            if (p->state == PORT_ACTIVE && !(pfd[i].revents & (POLLHUP | POLLNVAL))) p->hup = 0;
            if (p->state == PORT_ACTIVE) pump(p);
            continue;
        }
        // POLLHUP: still no host. Input may already be waiting even so (see settle); it is
        // read once the host's connect notice has arrived.
        if (!(pfd[i].revents & (POLLHUP | POLLNVAL)) && session_start(p) == 0) pump(p);
    }
}

// Testing mode: reads `NAME down` and `NAME up` lines standing for the driver's notices.
static void read_notices(void) {
    static char line[256];
    static size_t used;
    for (;;) {
        ssize_t n = read(notice_fd, line + used, sizeof line - 1 - used);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            close_fd(&notice_fd);
            return;
        }
        used += (size_t)n;
        char *nl;
        while ((nl = memchr(line, '\n', used))) {
            *nl = 0;
            char *space = strchr(line, ' ');
            if (space) {
                *space = 0;
                for (int i = 0; i < nports; i++) {
                    struct port *p = ports[i];
                    if (strcmp(p->name, line) != 0 || p->state != PORT_ACTIVE) continue;
                    if (strcmp(space + 1, "down") == 0 && p->inband) host_down(p);
                    else if (strcmp(space + 1, "up") == 0) p->hup = 0;
                }
            }
            used -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, used);
        }
        if (used == sizeof line - 1) used = 0;  // no newline in a whole buffer: not a notice
    }
}

// Opens /dev/<dev> (vport1p2), making the node from sysfs where devtmpfs has none, with
// SIGIO on host connect and disconnect.
static int port_open(const char *dev) {
    char node[300], path[512];
    snprintf(node, sizeof node, "/dev/%s", dev);
    int fd = open(node, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0 && errno == ENOENT) {
        char numbers[32];
        unsigned maj, min;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/dev", dev);
        if (read_small(path, numbers, sizeof numbers) > 0 && sscanf(numbers, "%u:%u", &maj, &min) == 2 &&
            mknod(node, S_IFCHR | 0600, makedev(maj, min)) == 0)
            fd = open(node, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    }
    if (fd < 0) return -1;
    fcntl(fd, F_SETOWN, getpid());
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC | O_NONBLOCK);
    return fd;
}

static int port_name_ok(const char *name, char *logical, size_t size) {
    if (strcmp(name, "org.vmpool.ctl") == 0) {
        snprintf(logical, size, "ctl");
        return 1;
    }
    const char *prefix = "org.vmpool.exec.";
    size_t plen = strlen(prefix);
    if (strncmp(name, prefix, plen) != 0 || !name[plen] || strlen(name + plen) > 3) return 0;
    for (const char *c = name + plen; *c; c++)
        if (!isdigit((unsigned char)*c)) return 0;
    snprintf(logical, size, "exec.%.3s", name + plen);
    return 1;
}

// Opens the vmpool ports listed in /sys/class/virtio-ports that are not open yet and closes
// the ones that are gone.
static void scan_ports(void) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return;
    for (int i = 0; i < nports; i++) ports[i]->seen = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[512], name[128], logical[64];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_small(path, name, sizeof name) <= 0) continue;
        name[strcspn(name, "\n")] = 0;
        if (!port_name_ok(name, logical, sizeof logical)) continue;
        struct port *known = NULL;
        for (int i = 0; i < nports; i++)
            if (strcmp(ports[i]->dev, e->d_name) == 0) known = ports[i];
        if (known) {
            known->seen = 1;
            continue;
        }
        int fd = port_open(e->d_name);
        if (fd < 0) continue;  // busy (another agent) or not ready: the next scan retries
        struct port *p = port_new(logical, fd);
        if (!p) {
            close(fd);
            continue;
        }
        snprintf(p->dev, sizeof p->dev, "%s", e->d_name);
        p->seen = 1;
    }
    closedir(d);
    for (int i = nports - 1; i >= 0; i--)
        if (!ports[i]->seen) port_remove(i);
    have_ctl = 0;
    for (int i = 0; i < nports; i++)
        if (strcmp(ports[i]->name, "ctl") == 0) have_ctl = 1;
    check_idle();
}

// Drains the uevent socket; true when a virtio port changed.
static int uevent_changed(void) {
    char buf[8192];
    int changed = 0;
    for (;;) {
        ssize_t n = recv(uevent_fd, buf, sizeof buf - 1, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == ENOBUFS) {
                changed = 1;  // lost events: rescan
                continue;
            }
            if (errno == EINTR) continue;
            return changed;
        }
        buf[n] = 0;
        if (memmem(buf, (size_t)n, "virtio-ports", 12)) changed = 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Main loop

static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        for (int i = 0; i < nports; i++) {
            struct job *j = ports[i]->job;
            if (j && j->pid == pid) {
                j->exited = 1;
                j->status = status;
            }
        }
    }
}

static void shutdown_all(int code) {
    for (int i = 0; i < nports; i++)
        if (ports[i]->job) job_signal(ports[i]->job, SIGKILL);
    exit(code);
}

static int handle_signals(void) {
    struct signalfd_siginfo si;
    int io = 0;
    while (read(sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGCHLD) reap();
        else if (si.ssi_signo == SIGIO) io = 1;
        else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT || si.ssi_signo == SIGHUP) shutdown_all(0);
    }
    return io;
}

static void usage(void) {
    fprintf(stderr, "usage: vmpool-agent [--host-gone-ms MS] [--fd NAME=FD ... [--notices FD]]\n"
                    "  Without --fd, serves the virtio-serial ports org.vmpool.ctl and\n"
                    "  org.vmpool.exec.N; with --fd, serves the given open descriptors, and takes\n"
                    "  lines `NAME down|up` on the --notices descriptor as host notices.\n");
    exit(2);
}

int main(int argc, char **argv) {
    // Descriptors 0-2 must exist so that no pipe lands there.
    for (int fd = open("/dev/null", O_RDWR); fd >= 0 && fd <= 2; fd = open("/dev/null", O_RDWR)) {
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
            char *spec = argv[++i];
            char *eq = strchr(spec, '=');
            char *end;
            if (!eq || eq == spec) usage();
            *eq = 0;
            long fd = strtol(eq + 1, &end, 10);
            if (*end || end == eq + 1 || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
                fprintf(stderr, "vmpool-agent: --fd %s: not an open descriptor\n", spec);
                return 2;
            }
            fcntl((int)fd, F_SETFD, FD_CLOEXEC);
            set_nonblock((int)fd);
            struct port *p = port_new(spec, (int)fd);
            if (!p) {
                fprintf(stderr, "vmpool-agent: too many ports\n");
                return 2;
            }
            testing = 1;
        } else if (strcmp(argv[i], "--notices") == 0 && i + 1 < argc) {
            char *end;
            long fd = strtol(argv[++i], &end, 10);
            if (*end || end == argv[i] || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
                fprintf(stderr, "vmpool-agent: --notices %s: not an open descriptor\n", argv[i]);
                return 2;
            }
            notice_fd = (int)fd;
            fcntl(notice_fd, F_SETFD, FD_CLOEXEC);
            set_nonblock(notice_fd);
        } else if (strcmp(argv[i], "--host-gone-ms") == 0 && i + 1 < argc) {
            char *end;
            long long ms = strtoll(argv[++i], &end, 10);
            if (*end || end == argv[i] || ms < 1 || ms > 3600000) usage();
            host_gone_ms = ms;
        } else {
            usage();
        }
    }

    signal(SIGPIPE, SIG_IGN);
    load_defaults();
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGIO);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sig_fd < 0) {
        perror("vmpool-agent: signalfd");
        return 1;
    }
    // Orphans of commands (daemons they started) become our children and are reaped here.
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    // SCHED_BATCH: a wakeup of the agent does not preempt the command that woke it. A
    // command writing its output in small pieces (busybox writes 4 KiB at a time) then fills
    // the pipe for a while before the agent reads it, in 64 KiB frames instead of one frame
    // and two context switches per write: 100 MiB of `head -c` under TCG, 1 vCPU, went from
    // 8.9 to 17 MiB/s. Answers wait at most for the next tick. Commands run as SCHED_OTHER.
    struct sched_param sp = {0};
    sched_setscheduler(0, SCHED_BATCH, &sp);

    if (notice_fd >= 0 && !testing) usage();
    if (testing) {
        for (int i = 0; i < nports; i++) session_start(ports[i]);
    } else {
        uevent_fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
        if (uevent_fd >= 0) {
            struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = 1};
            if (bind(uevent_fd, (struct sockaddr *)&sa, sizeof sa) != 0) close_fd(&uevent_fd);
        }
        identity_on_tmpfs();
        fixed_layout = under_tcg();
        scan_ports();
    }

    struct pollfd pfd[2 + MAX_PORTS * 5];
    struct port *slot[MAX_PORTS];
    for (;;) {
        int n = 0;
        pfd[n++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
        pfd[n++] = (struct pollfd){.fd = testing ? notice_fd : uevent_fd, .events = POLLIN};
        int live = 0;
        long long now = now_ms(), wake = -1;
        // Per port: the port, then its job's status, stdout, stderr and stdin (fd -1 when unused).
        // An in-band port without a host shown connected is left out (virtio reports POLLHUP
        // then without end) but its command is served; SIGIO and host_check watch the port.
        for (int i = 0; i < nports; i++) {
            struct port *p = ports[i];
            long long due = host_check(p, now);
            if (due >= 0 && (wake < 0 || due < wake)) wake = due;
            struct job *j = p->job;
            struct pollfd *f = pfd + n;
            n += 5;
            for (int k = 0; k < 5; k++) f[k] = (struct pollfd){.fd = -1};
            slot[i] = p->state == PORT_ACTIVE ? p : NULL;
            if (p->state != PORT_ACTIVE) continue;
            live++;
            if (!p->hup || testing) f[0].fd = p->fd;
            if (p->in_end < IN_SIZE || p->in_start > 0) f[0].events |= POLLIN;
            if (out_used(p) > 0) f[0].events |= POLLOUT;
            if (!j) continue;
            int room = out_free(p) >= OUT_RESERVE + FRAME_HEADER + MIN_READ;
            if (j->status_fd >= 0) f[1] = (struct pollfd){.fd = j->status_fd, .events = POLLIN};
            if (j->started && room && j->out_fd >= 0) f[2] = (struct pollfd){.fd = j->out_fd, .events = POLLIN};
            if (j->started && room && j->err_fd >= 0) f[3] = (struct pollfd){.fd = j->err_fd, .events = POLLIN};
            if (p->blocked == BLOCK_STDIN && j->in_fd >= 0)
                f[4] = (struct pollfd){.fd = j->in_fd, .events = POLLOUT};
        }
        if (testing && live == 0) return 0;
        // Scan mode: rescan every 500 ms until the control port shows up (virtio_console may
        // load after us), then on uevents only; every 5 s where uevents are not available.
        int timeout = testing ? -1 : !have_ctl ? 500 : uevent_fd < 0 ? 5000 : -1;
        if (wake >= 0 && (timeout < 0 || wake < timeout)) timeout = (int)(wake + 1);
        int rc = poll(pfd, (nfds_t)n, timeout);
        if (rc < 0) {
            if (errno == EINTR) continue;
            perror("vmpool-agent: poll");
            return 1;
        }
        int io = 0;
        if (pfd[0].revents) io = handle_signals();
        if (testing && pfd[1].fd >= 0 && pfd[1].revents) read_notices();
        if (!testing && ((uevent_fd >= 0 && pfd[1].revents && uevent_changed()) || (rc == 0 && wake < 0))) {
            // Ports may have come or gone: the poll slots no longer match; poll again.
            scan_ports();
            for (int i = 0; i < nports; i++)
                if (ports[i]->state == PORT_ACTIVE) pump(ports[i]);
            continue;
        }
        for (int i = 0, base = 2; i < nports; i++, base += 5) {
            struct port *p = ports[i];
            struct pollfd *f = pfd + base;
            if (p->state != PORT_ACTIVE || slot[i] != p) continue;
            if (f[0].fd >= 0 && (f[0].revents & (POLLHUP | POLLERR | POLLNVAL))) {
                if (testing || !p->inband) {
                    session_end(p);
                    continue;
                }
                // In-band: take the data that is here, then wait and see (host_check).
                if (f[0].revents & POLLIN) port_read(p);
                if (p->state != PORT_ACTIVE) continue;
                host_down(p);
                f[0].revents = 0;
            }
            if (f[0].fd >= 0 && (f[0].revents & POLLOUT)) port_flush(p);
            if (p->state == PORT_ACTIVE && f[0].fd >= 0 && (f[0].revents & POLLIN)) port_read(p);
            if (p->state != PORT_ACTIVE) continue;
            struct job *j = p->job;
            if (j && f[1].fd == j->status_fd && f[1].revents) job_status(j);
            if (j && f[2].fd >= 0 && f[2].fd == j->out_fd && f[2].revents) job_read(p, &j->out_fd, 'O');
            if (j && f[3].fd >= 0 && f[3].fd == j->err_fd && f[3].revents) job_read(p, &j->err_fd, 'E');
            if (j && f[4].fd >= 0 && f[4].revents && p->blocked == BLOCK_STDIN) p->blocked = BLOCK_NONE;
            pump(p);
        }
        if (!testing && (io || idle_changed)) {
            idle_changed = 0;
            check_idle();
        }
    }
}
