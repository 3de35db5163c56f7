// vmpool guest agent, arguments, signals and the poll() loop (see agent.h).
#include "agent.h"

#include <limits.h>
#include <linux/netlink.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>

struct port *ports[MAX_PORTS];
int nports;
int testing;            // serving --fd descriptors
int fixed_layout;       // commands start without address-space randomization (TCG)
static int sig_fd = -1;
int uevent_fd = -1;
int have_ctl;           // the control port was found (scan mode)
int idle_changed;       // a virtio port went idle: check whether a host is back
int notice_fd = -1;     // testing mode: lines `NAME down|up` standing for the notices
long long host_gone_ms = 3000; // in-band: a silent, disconnected host is gone after this

// ---------------------------------------------------------------------------------------------
// Main loop

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

// --fd NAME=N: serve descriptor N as port NAME (testing mode).
static void take_fd(char *spec) {
    char *eq = strchr(spec, '=');
    char *end;
    if (!eq || eq == spec) usage();
    *eq = 0;
    long fd = strtol(eq + 1, &end, 10);
    if (*end || end == eq + 1 || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
        fprintf(stderr, "vmpool-agent: --fd %s: not an open descriptor\n", spec);
        exit(2);
    }
    fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    set_nonblock((int)fd);
    struct port *p = port_new(spec, (int)fd);
    if (!p) {
        fprintf(stderr, "vmpool-agent: too many ports\n");
        exit(2);
    }
    testing = 1;
}

// --notices N: lines `NAME down|up` on descriptor N (testing mode).
static void take_notices(const char *arg) {
    char *end;
    long fd = strtol(arg, &end, 10);
    if (*end || end == arg || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
        fprintf(stderr, "vmpool-agent: --notices %s: not an open descriptor\n", arg);
        exit(2);
    }
    notice_fd = (int)fd;
    fcntl(notice_fd, F_SETFD, FD_CLOEXEC);
    set_nonblock(notice_fd);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
            take_fd(argv[++i]);
        } else if (strcmp(argv[i], "--notices") == 0 && i + 1 < argc) {
            take_notices(argv[++i]);
        } else if (strcmp(argv[i], "--host-gone-ms") == 0 && i + 1 < argc) {
            char *end;
            long long ms = strtoll(argv[++i], &end, 10);
            if (*end || end == argv[i] || ms < 1 || ms > 3600000) usage();
            host_gone_ms = ms;
        } else {
            usage();
        }
    }
}

// Signals through a signalfd, the image's defaults for commands, the scheduling policy; then the
// ports: the --fd descriptors, or the virtio ports found now and on uevents.
static void setup(void) {
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
        exit(1);
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
        return;
    }
    uevent_fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
    if (uevent_fd >= 0) {
        struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = 1};
        if (bind(uevent_fd, (struct sockaddr *)&sa, sizeof sa) != 0) close_fd(&uevent_fd);
    }
    identity_on_tmpfs();
    fixed_layout = under_tcg();
    scan_ports();
}

// The poll set: the signalfd, the uevent socket (testing mode: the notices), then per port
// PORT_SLOTS entries: the port, then its job's status, stdout, stderr and stdin (fd -1 when
// unused). `slot` remembers which ports were active when the set was made.
#define PORT_SLOTS 5
static struct pollfd pfd[2 + MAX_PORTS * PORT_SLOTS];
static struct port *slot[MAX_PORTS];

// Fills the port's entries `f`; returns whether the port is active.
static int poll_port(int i, struct pollfd *f) {
    struct port *p = ports[i];
    struct job *j = p->job;
    for (int k = 0; k < PORT_SLOTS; k++) f[k] = (struct pollfd){.fd = -1};
    slot[i] = p->state == PORT_ACTIVE ? p : NULL;
    if (p->state != PORT_ACTIVE) return 0;
    // An in-band port without a host shown connected is left out (virtio reports POLLHUP then
    // without end) but its command is served; SIGIO and host_check watch the port.
    if (!p->hup || testing) f[0].fd = p->fd;
    if (p->in_end < IN_SIZE || p->in_start > 0) f[0].events |= POLLIN;
    if (out_used(p) > 0) f[0].events |= POLLOUT;
    if (!j) return 1;
    int room = out_free(p) >= OUT_RESERVE + FRAME_HEADER + MIN_READ;
    if (j->status_fd >= 0) f[1] = (struct pollfd){.fd = j->status_fd, .events = POLLIN};
    if (j->started && room && j->out_fd >= 0) f[2] = (struct pollfd){.fd = j->out_fd, .events = POLLIN};
    if (j->started && room && j->err_fd >= 0) f[3] = (struct pollfd){.fd = j->err_fd, .events = POLLIN};
    if (p->blocked == BLOCK_STDIN && j->in_fd >= 0) f[4] = (struct pollfd){.fd = j->in_fd, .events = POLLOUT};
    return 1;
}

// Makes the poll set; returns its size. `*wake` is the ms until a host_check is due (-1: none),
// `*live` the number of active ports.
static int poll_set(long long *wake, int *live) {
    int n = 0;
    pfd[n++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
    pfd[n++] = (struct pollfd){.fd = testing ? notice_fd : uevent_fd, .events = POLLIN};
    long long now = now_ms();
    for (int i = 0; i < nports; i++, n += PORT_SLOTS) {
        long long due = host_check(ports[i], now);
        if (due >= 0 && (*wake < 0 || due < *wake)) *wake = due;
        *live += poll_port(i, pfd + n);
    }
    return n;
}

// Serves what poll() reported for port `i`, whose entries are `f`.
static void serve_port(int i, struct pollfd *f) {
    struct port *p = ports[i];
    if (p->state != PORT_ACTIVE || slot[i] != p) return;
    if (f[0].fd >= 0 && (f[0].revents & (POLLHUP | POLLERR | POLLNVAL))) {
        if (testing || !p->inband) {
            session_end(p);
            return;
        }
        // In-band: take the data that is here, then wait and see (host_check).
        if (f[0].revents & POLLIN) port_read(p);
        if (p->state != PORT_ACTIVE) return;
        host_down(p);
        f[0].revents = 0;
    }
    if (f[0].fd >= 0 && (f[0].revents & POLLOUT)) port_flush(p);
    if (p->state == PORT_ACTIVE && f[0].fd >= 0 && (f[0].revents & POLLIN)) port_read(p);
    if (p->state != PORT_ACTIVE) return;
    struct job *j = p->job;
    if (j && f[1].fd == j->status_fd && f[1].revents) job_status(j);
    if (j && f[2].fd >= 0 && f[2].fd == j->out_fd && f[2].revents) job_read(p, &j->out_fd, 'O');
    if (j && f[3].fd >= 0 && f[3].fd == j->err_fd && f[3].revents) job_read(p, &j->err_fd, 'E');
    if (j && f[4].fd >= 0 && f[4].revents && p->blocked == BLOCK_STDIN) p->blocked = BLOCK_NONE;
    pump(p);
}

int main(int argc, char **argv) {
    // Descriptors 0-2 must exist so that no pipe lands there.
    for (int fd = open("/dev/null", O_RDWR); fd >= 0 && fd <= 2; fd = open("/dev/null", O_RDWR)) {
    }
    parse_args(argc, argv);
    setup();
    for (;;) {
        long long wake = -1;
        int live = 0;
        int n = poll_set(&wake, &live);
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
        for (int i = 0; i < nports; i++) serve_port(i, pfd + 2 + i * PORT_SLOTS);
        if (!testing && (io || idle_changed)) {
            idle_changed = 0;
            check_idle();
        }
    }
}
