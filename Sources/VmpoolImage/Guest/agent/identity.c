// vmpool guest agent, guest facts and identity: CPUs, memory, clock, RNG seed, hostname, machine id (see agent.h).
#include "agent.h"

#include <ctype.h>
#include <dirent.h>
#include <linux/magic.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>

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

void info(struct port *p, const char *id) {
    char data[128];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(data, sizeof data, "cpus=%d memMiB=%ld time=%lld.%06ld", online_cpus(), online_mem_mib(),
             (long long)now.tv_sec, now.tv_nsec / 1000);
    answer(p, id, "ok", data);
}

// Writes `value` to `<dir>/<entry>/<file>` for every entry `<prefix><digits>` whose file
// reads `offline`.
void online_all(const char *dir, const char *prefix, const char *file, const char *offline,
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
int parse_time(const char *text, struct timespec *ts) {
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

int valid_hex(const char *hex) {
    size_t len = hex ? strlen(hex) : 0;
    if (len == 0 || len % 2 || len > 1024) return 0;
    for (size_t i = 0; i < len; i++)
        if (hexval(hex[i]) < 0) return 0;
    return 1;
}

// Adds host entropy to the kernel RNG, credited; falls back to mixing it in uncredited.
int seed(const char *hex) {
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
int valid_hostname(const char *name) {
    size_t len = strlen(name);
    if (len < 1 || len > 63) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && !(c == '-' && i > 0 && i < len - 1)) return 0;
    }
    return 1;
}

int valid_machine_id(const char *id) {
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

int set_hostname(const char *name, char *err, size_t errlen) {
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

int set_machine_id(const char *id, char *err, size_t errlen) {
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

// Where /etc is on a disk (the Debian guest), the files a clone rewrites at hello are
// bind-mounted from copies in /run first: a clone's first write to ext4 runs the filesystem's
// journaling code for the first time in that QEMU process, 50-60 ms of translation under TCG
// while the host waits for the answer. The disk keeps the template's files; a VM's disk does
// not outlive the VM. Already bind-mounted files (systemd's transient machine-id) are left.
void identity_on_tmpfs(void) {
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
