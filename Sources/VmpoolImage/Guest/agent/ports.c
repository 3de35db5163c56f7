// vmpool guest agent, finding and opening the virtio-serial ports; testing mode's notices (see agent.h).
#include "agent.h"

#include <ctype.h>
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

// ---------------------------------------------------------------------------------------------
// Ports

struct port *port_new(const char *name, int fd) {
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
void check_idle(void) {
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
void read_notices(void) {
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
void scan_ports(void) {
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
int uevent_changed(void) {
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
