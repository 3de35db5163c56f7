// vmpool guest agent, small helpers (see agent.h).
#include "agent.h"

#include <ctype.h>

// ---------------------------------------------------------------------------------------------
// Small helpers

void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

void close_fd(int *fd) {
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void set_nonblock(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

int read_small(const char *path, char *buf, size_t size) {
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

int write_small(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n < 0 ? -1 : 0;
}

int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// "ROWSxCOLS", each 1..65535.
int parse_size(const char *text, unsigned short *rows, unsigned short *cols) {
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
