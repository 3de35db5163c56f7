/// The guest agent's C source. `vmpool image build` compiles it into a static executable
/// with the host's C compiler and puts it into the initramfs as /bin/vmpool-agent.
enum GuestAgentSource {
    static let c = #"""
    // vmpool guest agent: answers the host on a serial port inside every VM.
    //
    // One request per line, `ID COMMAND [ARGS]`; one answer per line, `ID ok [DATA]` or
    // `ID error MESSAGE`. Commands:
    //   ping                 -> ID ok pong
    //   info                 -> ID ok cpus=N memMiB=M time=SEC.USEC   (online CPUs, MemTotal, clock)
    //   online               -> bring every offline CPU and memory block online, then as info
    //   time SEC[.FRAC]      -> set the clock (CLOCK_REALTIME)
    //   seed HEX             -> add the bytes to the kernel RNG, credited as entropy
    //   hello SEC[.FRAC] HEX -> time and seed in one round trip, then pong (after a clone)
    //
    // A compiled agent answers without forking: under TCG a fork of the guest shell costs
    // tens of milliseconds, and a clone's readiness waits on the clock and RNG refresh.
    // Built as a static executable and placed in the initramfs by `vmpool image build`.
    #define _GNU_SOURCE
    #include <ctype.h>
    #include <dirent.h>
    #include <errno.h>
    #include <fcntl.h>
    #include <linux/random.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/ioctl.h>
    #include <termios.h>
    #include <time.h>
    #include <unistd.h>

    static int port = -1;

    static void reply(const char *id, const char *status, const char *data) {
        char line[512];
        int n = snprintf(line, sizeof line, "%s %s%s%s\n", id, status, data && *data ? " " : "", data ? data : "");
        if (n < 0) return;
        if (n >= (int)sizeof line) {  // truncated: still one line
            n = sizeof line - 1;
            line[n - 1] = '\n';
        }
        for (int off = 0; off < n;) {
            ssize_t w = write(port, line + off, n - off);
            if (w < 0) {
                if (errno == EINTR) continue;
                return;
            }
            off += (int)w;
        }
    }

    static int read_small(const char *path, char *buf, size_t size) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return -1;
        ssize_t n = read(fd, buf, size - 1);
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

    // Online CPUs from a list like "0-2,4".
    static int online_cpus(void) {
        char buf[256];
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

    static void info(const char *id) {
        char data[128];
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        snprintf(data, sizeof data, "cpus=%d memMiB=%ld time=%lld.%06ld", online_cpus(), mem_total_mib(),
                 (long long)now.tv_sec, now.tv_nsec / 1000);
        reply(id, "ok", data);
    }

    // Writes `value` to `<dir>/<entry>/<file>` for every entry starting with `prefix` whose file reads `offline`.
    static void online_all(const char *dir, const char *prefix, const char *file, const char *offline, const char *value) {
        DIR *d = opendir(dir);
        if (!d) return;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (strncmp(e->d_name, prefix, strlen(prefix)) != 0 || !isdigit((unsigned char)e->d_name[strlen(prefix)]))
                continue;
            char path[512], state[64];
            snprintf(path, sizeof path, "%s/%s/%s", dir, e->d_name, file);
            if (read_small(path, state, sizeof state) < 0) continue;
            state[strcspn(state, "\n")] = 0;
            if (strcmp(state, offline) == 0) write_small(path, value);
        }
        closedir(d);
    }

    static int set_time(const char *text) {
        if (!text || !*text) return -1;
        char *end = NULL;
        errno = 0;
        long long sec = strtoll(text, &end, 10);
        if (errno || end == text || sec < 0) return -1;
        long nsec = 0;
        if (*end == '.') {
            long scale = 100000000;
            for (const char *p = end + 1; isdigit((unsigned char)*p); p++, scale /= 10)
                if (scale > 0) nsec += (*p - '0') * scale;
        } else if (*end) {
            return -1;
        }
        struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = nsec};
        return clock_settime(CLOCK_REALTIME, &ts);
    }

    static int hexval(int c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
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
        size_t len = hex ? strlen(hex) : 0;
        if (len == 0 || len % 2 || len > 1024) return -1;
        struct {
            struct rand_pool_info info;
            unsigned char bytes[512];
        } pool;
        size_t n = len / 2;
        for (size_t i = 0; i < n; i++) {
            int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
            if (hi < 0 || lo < 0) return -1;
            pool.bytes[i] = (unsigned char)(hi << 4 | lo);
        }
        pool.info.entropy_count = (int)(n * 8);
        pool.info.buf_size = (int)n;
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0) return -1;
        int rc = ioctl(fd, RNDADDENTROPY, &pool.info);
        if (rc != 0) rc = write(fd, pool.bytes, n) == (ssize_t)n ? 0 : -1;
        close(fd);
        return rc;
    }

    static void handle(char *line) {
        char *save = NULL;
        char *id = strtok_r(line, " \t\r", &save);
        if (!id) return;
        char *cmd = strtok_r(NULL, " \t\r", &save);
        char *a1 = strtok_r(NULL, " \t\r", &save);
        char *a2 = strtok_r(NULL, " \t\r", &save);
        if (!cmd) {
            reply(id, "error", "missing command");
        } else if (strcmp(cmd, "ping") == 0) {
            reply(id, "ok", "pong");
        } else if (strcmp(cmd, "info") == 0) {
            info(id);
        } else if (strcmp(cmd, "online") == 0) {
            online_all("/sys/devices/system/memory", "memory", "state", "offline", "online");
            online_all("/sys/devices/system/cpu", "cpu", "online", "0", "1");
            info(id);
        } else if (strcmp(cmd, "time") == 0) {
            if (set_time(a1) == 0) reply(id, "ok", NULL); else reply(id, "error", "invalid time");
        } else if (strcmp(cmd, "seed") == 0) {
            if (seed(a1) == 0) reply(id, "ok", NULL); else reply(id, "error", "invalid hex");
        } else if (strcmp(cmd, "hello") == 0) {
            // Both arguments are checked before either takes effect.
            if (!valid_hex(a2)) reply(id, "error", "invalid hex");
            else if (set_time(a1) != 0) reply(id, "error", "invalid time");
            else if (seed(a2) != 0) reply(id, "error", "cannot seed the RNG");
            else reply(id, "ok", "pong");
        } else {
            reply(id, "error", "unknown command");
        }
    }

    int main(int argc, char **argv) {
        const char *path = argc > 1 ? argv[1] : "/dev/ttyS1";
        port = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (port < 0) {
            perror(path);
            return 1;
        }
        struct termios tio;
        if (tcgetattr(port, &tio) == 0) {
            cfmakeraw(&tio);
            cfsetispeed(&tio, B115200);
            cfsetospeed(&tio, B115200);
            tio.c_cc[VMIN] = 1;
            tio.c_cc[VTIME] = 0;
            tcsetattr(port, TCSANOW, &tio);
        }
        char line[2048];
        size_t used = 0;
        int discarding = 0;  // inside a line too long to be a request
        for (;;) {
            char chunk[256];
            ssize_t n = read(port, chunk, sizeof chunk);
            if (n < 0) {
                if (errno == EINTR || errno == EAGAIN) continue;
                return 1;
            }
            if (n == 0) continue;
            for (ssize_t i = 0; i < n; i++) {
                char c = chunk[i];
                if (c == '\n') {
                    line[used] = 0;
                    if (!discarding) handle(line);
                    used = 0;
                    discarding = 0;
                } else if (used < sizeof line - 1) {
                    line[used++] = c;
                } else {
                    used = 0;  // an overlong line is dropped whole
                    discarding = 1;
                }
            }
        }
    }
    """#
}
